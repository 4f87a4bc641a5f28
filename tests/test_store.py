"""The task database: the query language (pure) and the SQLite store (a file in tmp_path,
no controller; one child process for the crash test)."""

from __future__ import annotations

import array
import json
import math
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kernel_engine.controller import query as q
from kernel_engine.controller.sqlite_store import (
    BLOB_MARKER,
    MAX_OUTPUT,
    PAGE_SIZE,
    SMALL_LIMIT,
    TRUNCATED,
    SqliteLog,
    StoreError,
    StoreUnusable,
)

NOW = time.time()


def frames(msg_id: str, content: dict[str, Any], *buffers: bytes) -> list[bytes]:
    """A message's frames as the controller sees them: header, parent, metadata, content,
    buffers."""
    header = {"msg_id": msg_id, "msg_type": "apply_request", "date": "2026-01-01T00:00:00Z"}
    parts = [header, {}, {"engine": 1}, content]
    return [json.dumps(p).encode() for p in parts] + list(buffers)


@pytest.fixture
def store(open_store) -> SqliteLog:
    return open_store()


def wait_until(predicate: Callable[[], bool], timeout: float = 10.0) -> bool:
    """Whether ``predicate`` came true within ``timeout`` (the store's own timers run it)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def submit(store: SqliteLog, msg_id: str, at: float | None = None, **fields: Any) -> None:
    at = time.time() if at is None else at  # (now, not when the module was imported)
    fields = {"request": frames(msg_id, {}, b"f", b"args"), **fields}
    store.put(
        msg_id,
        msg_type="apply_request",
        client_uuid="client-1",
        status="pending",
        submitted=at,
        **fields,
    )


def complete(
    store: SqliteLog, msg_id: str, status: str = "ok", at: float | None = None, **fields: Any
):
    at = time.time() if at is None else at
    fields = {"result": frames(msg_id, {"status": status}, b"result"), **fields}
    store.put(msg_id, status=status, started=at, completed=at, **fields)


# -- the query language ------------------------------------------------------------------


def test_check_query_normalises():
    when = datetime(2026, 1, 1, tzinfo=timezone.utc)
    got = q.check_query(
        {
            "status": "ok",
            "engine_id": {"$in": [1, 2, 2]},
            "completed": {"$gte": when, "$lt": "2026-01-02T00:00:00Z"},
            "label": None,
        }
    )
    assert got == {
        "status": {"$eq": "ok"},
        "engine_id": {"$in": (1, 2)},
        "completed": {"$gte": when.timestamp(), "$lt": when.timestamp() + 86400},
        "label": {"$eq": None},
    }
    assert q.check_query(got) == got


@pytest.mark.parametrize(
    ("query", "error", "named"),
    [
        ([("status", "ok")], TypeError, "dict"),
        ({"bogus": 1}, ValueError, "bogus"),
        ({"header": {}}, ValueError, "header"),
        ({"status": {"$regex": "o"}}, ValueError, "status"),
        ({"status": {}}, ValueError, "status"),
        ({"engine_id": "1"}, TypeError, "engine_id"),
        ({"engine_id": True}, TypeError, "engine_id"),
        ({"engine_id": 2**60}, ValueError, "engine_id"),
        ({"submitted": math.nan}, ValueError, "submitted"),
        ({"submitted": "yesterday"}, ValueError, "submitted"),
        ({"status": 3}, TypeError, "status"),
        ({"status": ["ok"]}, TypeError, "status"),
        ({"msg_id": None}, ValueError, "msg_id"),
        ({"started": {"$lt": None}}, TypeError, "started"),
        ({"status": {"$in": "ok"}}, TypeError, "status"),
        ({"status": {"$in": ["ok", None]}}, TypeError, "status"),
        ({"status": {"$nin": ["x"] * 10_001}}, ValueError, "status"),
        ({"label": "\udc80"}, ValueError, "label"),
        (
            {"msg_id": {"$in": ["x"] * 10_000}, "label": {"$in": ["y"] * 10_001}},
            ValueError,
            "label",
        ),
        (
            {k: {"$nin": ["x" * 100] * 10_000} for k in ("msg_id", "label", "status")},
            ValueError,
            "too large",
        ),
    ],
)
def test_check_query_rejects(query, error, named):
    with pytest.raises(error, match=named):
        q.check_query(query)


def test_check_keys():
    assert "buffers" not in q.DEFAULT_KEYS and "result_buffers" not in q.DEFAULT_KEYS
    assert set(q.KEYS) - set(q.DEFAULT_KEYS) == {"buffers", "result_buffers"}
    assert q.check_keys(None) == q.DEFAULT_KEYS
    assert q.check_keys(["status", "buffers", "status"]) == ("msg_id", "status", "buffers")
    with pytest.raises(ValueError, match="bogus"):
        q.check_keys(["bogus"])
    with pytest.raises(TypeError):
        q.check_keys("status")


ROWS = [
    {"msg_id": "a", "engine_id": 0, "status": "ok", "completed": 10.0, "label": "x"},
    {"msg_id": "b", "engine_id": 1, "status": "error", "completed": 20.0, "label": None},
    {"msg_id": "c", "engine_id": None, "status": "pending", "completed": None, "label": "y"},
]

OPERATOR_CASES = [
    ({"status": "ok"}, "a"),
    ({"engine_id": {"$eq": 1}}, "b"),
    ({"label": {"$eq": None}}, "b"),
    ({"engine_id": {"$ne": 1}}, "ac"),  # an unset field is not equal to 1
    ({"label": {"$ne": None}}, "ac"),
    ({"engine_id": {"$in": [0, 1]}}, "ab"),
    ({"engine_id": {"$in": []}}, ""),
    ({"engine_id": {"$nin": [0]}}, "bc"),
    ({"engine_id": {"$nin": []}}, "abc"),
    ({"completed": {"$lt": 20}}, "a"),  # never an unset field
    ({"completed": {"$lte": 20}}, "ab"),
    ({"completed": {"$gt": 10}}, "b"),
    ({"completed": {"$gte": 10, "$lt": 15}}, "a"),
    ({"status": {"$gte": "ok"}, "engine_id": {"$ne": None}}, "a"),
    ({}, "abc"),
]


@pytest.mark.parametrize(("query", "expected"), OPERATOR_CASES)
def test_each_operator(query, expected, store):
    assert "".join(r["msg_id"] for r in ROWS if q.matches(r, query)) == expected
    for row in ROWS:
        store.put(row["msg_id"], **{k: v for k, v in row.items() if k != "msg_id"})
    found = store.query(query, keys=["msg_id"])
    assert "".join(r["msg_id"] for r in found) == expected


TEXTS = st.sampled_from(["", "a", "ab", "b", "ok", "é", "\x00", "Z", "ü"]) | st.text(max_size=3)
INTS = st.integers(-3, 3) | st.integers(-(2**53), 2**53)
FLOATS = st.sampled_from([0.0, -0.0, 1.5, 2.0, 1e9]) | st.floats(-1e12, 1e12)
NUMBERS = INTS | FLOATS


def _values(key: str, for_row: bool) -> st.SearchStrategy[Any]:
    if key == "engine_id":
        return INTS if for_row else NUMBERS
    if key in q.DATES:
        return FLOATS if for_row else NUMBERS | st.sampled_from([math.inf, -math.inf])
    return TEXTS


ROW_KEYS = [k for k in q.QUERYABLE if k != "msg_id"]
rows_strategy = st.lists(
    st.fixed_dictionaries({}, optional={k: st.none() | _values(k, True) for k in ROW_KEYS}),
    max_size=8,
)


@st.composite
def queries(draw: st.DrawFn) -> dict[str, Any]:
    query: dict[str, Any] = {}
    for key in draw(st.lists(st.sampled_from(ROW_KEYS), min_size=1, max_size=3, unique=True)):
        value = _values(key, False)
        if draw(st.booleans()):
            query[key] = draw(st.none() | value)
            continue
        ops = {}
        for op in draw(st.lists(st.sampled_from(q.OPERATORS), min_size=1, max_size=3, unique=True)):
            if op in ("$in", "$nin"):
                ops[op] = draw(st.lists(value, max_size=4))
            elif op in ("$eq", "$ne"):
                ops[op] = draw(st.none() | value)
            else:
                ops[op] = draw(value)
        query[key] = ops
    return query


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rows=rows_strategy, query_list=st.lists(queries(), min_size=1, max_size=4))
def test_matches_equals_sql(rows, query_list):
    """Python's evaluation and SQLite's agree on every row, NULLs included."""
    con = sqlite3.connect(":memory:")
    columns = ", ".join(f"{k} {t}" for k, t in q.SQL_TYPES.items())
    con.execute(f"CREATE TABLE r ({columns})")
    table = [{"msg_id": f"m{i}", **row} for i, row in enumerate(rows)]
    for row in table:
        keys = list(row)
        con.execute(
            f"INSERT INTO r ({', '.join(keys)}) VALUES ({', '.join('?' * len(keys))})",
            [row[k] for k in keys],
        )
    for query in query_list:
        where, params = q.to_sql(query)
        in_sql = {m for (m,) in con.execute(f"SELECT msg_id FROM r WHERE {where}", params)}
        test = q.compile_query(query)
        assert {row["msg_id"] for row in table if test(row)} == in_sql, (query, where, params)
    con.close()


# -- the store ---------------------------------------------------------------------------


def test_record_round_trip(store):
    submit(store, "t1", at=NOW, label="first", after=["t0"], follow=[])
    store.put("t1", engine_id=2, engine_uuid="e-2")
    complete(store, "t1", at=NOW, received=NOW + 1)
    store.append_output("t1", "stdout", "hello ")
    store.append_output("t1", "stdout", "world")
    store.append_output("t1", "stderr", "oops")
    record = store.get("t1")
    assert record is not None
    assert list(record) == list(q.DEFAULT_KEYS)
    assert record["msg_type"] == "apply_request" and record["client_uuid"] == "client-1"
    assert (record["engine_id"], record["engine_uuid"], record["label"]) == (2, "e-2", "first")
    assert record["status"] == "ok" and record["completed"] == NOW and record["received"] == NOW + 1
    assert record["header"]["msg_id"] == "t1" and record["metadata"] == {"engine": 1}
    assert record["content"] == {} and record["result_content"] == {"status": "ok"}
    assert (record["after"], record["follow"]) == (["t0"], [])
    assert (record["stdout"], record["stderr"]) == ("hello world", "oops")
    buffers = store.get("t1", ["buffers", "result_buffers"])
    assert buffers == {"msg_id": "t1", "buffers": [b"f", b"args"], "result_buffers": [b"result"]}
    assert store.frames("t1", "result") == frames("t1", {"status": "ok"}, b"result")
    assert store.get("nope") is None and store.outcome("nope") is None
    assert store.outcome("t1") == (2, True)


def test_puts_merge_into_one_row_write(open_store):
    store = open_store(batch_interval=60.0)
    store.flush()
    before = store._con.total_changes
    submit(store, "m")
    store.put("m", engine_id=1)
    complete(store, "m", status="error")
    store.flush()
    assert store._con.total_changes - before == 1
    assert store.outcome("m") == (1, False)


def test_a_new_record_never_replaces_one_with_its_msg_id(open_store, caplog):
    store = open_store(blob_threshold=1024)
    big = os.urandom(4096)
    store.put("dup", msg_type="apply_request", client_uuid="first", request=frames("dup", {}, big))
    complete(store, "dup")
    submit(store, "other")
    store.flush()
    # a second task with that msg_id, in a later batch, beside a new record that is written
    store.put(
        "dup", msg_type="apply_request", client_uuid="second", request=frames("dup", {}, big[::-1])
    )
    store.put("dup", engine_id=7)
    submit(store, "new")
    store.flush()
    store.put("dup", status="error")  # and in the batch after
    store.flush()
    record = store.get("dup", ["client_uuid", "engine_id", "status", "buffers"])
    assert record == {
        "msg_id": "dup",
        "client_uuid": "first",
        "engine_id": None,
        "status": "ok",
        "buffers": [big],
    }
    assert store.history() == ["dup", "other", "new"]
    assert "reused msg_id dup" in caplog.text


def queued(store: SqliteLog, msg_id: str) -> None:
    """A load-balanced task's new record, as the hub puts it while the task is queued."""
    store.put_queued(
        msg_id,
        msg_type="apply_request",
        status="pending",
        submitted=time.time(),
        request=frames(msg_id, {}, b"f"),
    )


def _in_file(store: SqliteLog, msg_id: str) -> bool:
    con = sqlite3.connect(store.path)
    try:
        return con.execute("SELECT 1 FROM tasks WHERE msg_id = ?", (msg_id,)).fetchone() is not None
    finally:
        con.close()


def test_a_queued_tasks_record_waits_for_its_engine_then_is_written_once(open_store):
    store = open_store(batch_interval=0.01)
    store.flush()
    before = store._con.total_changes
    queued(store, "q1")
    time.sleep(0.2)  # batches go by; the record waits for an engine to take the task
    assert not _in_file(store, "q1")
    store.taken("q1")
    complete(store, "q1")
    assert wait_until(lambda: _in_file(store, "q1"))
    store.flush()
    assert store._con.total_changes - before == 1  # one insert, whole: no update
    assert store.outcome("q1") == (None, True)
    assert store.get("q1", ["status"])["status"] == "ok"


def test_a_taken_tasks_record_names_its_engine_while_it_runs(open_store, monkeypatch):
    """The engine that took a held record's task is in the record while the task runs,
    as memory's record has it (the file heard of it only with the outcome: a query for
    what runs on an engine found nothing), written once when the record was held, or as
    a put when a read or the hold had written the record already."""
    from kernel_engine.controller import sqlite_store

    monkeypatch.setattr(sqlite_store, "HOLD", 600.0)
    store = open_store(batch_interval=0.01)
    store.flush()
    before = store._con.total_changes
    queued(store, "held")
    store.taken("held", {"engine_id": 3, "engine_uuid": "e-3"})
    running = store.get("held", ["engine_id", "engine_uuid", "status"])
    assert running == {"msg_id": "held", "engine_id": 3, "engine_uuid": "e-3", "status": "pending"}
    assert store._con.total_changes - before == 1
    queued(store, "read")
    assert store.get("read", ["engine_id"])["engine_id"] is None  # (the read wrote it)
    store.taken("read", {"engine_id": 1})
    assert store.query({"engine_id": 1, "completed": None}, ["msg_id"]) == [{"msg_id": "read"}]
    complete(store, "read", engine_id=1)
    assert store.get("read", ["engine_id", "status"])["status"] == "ok"


def test_a_long_maps_queued_records_are_each_written_once(open_store, monkeypatch):
    # a map queues more tasks than the puts that may wait for the writer (max_pending):
    # their records are still held until taken, not written pending and then updated
    from kernel_engine.controller import sqlite_store

    monkeypatch.setattr(sqlite_store, "HOLD", 600.0)  # (the count is tested, not the age)
    store = open_store(batch_interval=0.01)
    n = 3 * store.max_pending
    store.flush()
    before = store._con.total_changes
    for i in range(n):
        queued(store, f"m{i}")
    time.sleep(0.1)  # batches go by
    for i in range(n):
        store.taken(f"m{i}")
        complete(store, f"m{i}")
    store.flush()
    # one insert each, whole (but where a batch took a task and not yet its completion:
    # a few; bound by max_pending instead, 10,000 of them were written twice)
    assert n <= store._con.total_changes - before <= n + 100
    assert store.count() == n


def test_a_queued_record_is_written_after_the_hold_or_for_a_read(open_store, monkeypatch):
    from kernel_engine.controller import sqlite_store

    monkeypatch.setattr(sqlite_store, "HOLD", 0.3)
    store = open_store(batch_interval=0.01)
    queued(store, "late")
    t0 = time.monotonic()
    assert wait_until(lambda: _in_file(store, "late"), timeout=5)  # nobody took it
    assert 0.25 < time.monotonic() - t0 < 3
    assert store.get("late", ["status"])["status"] == "pending"
    queued(store, "read")
    assert store.get("read", ["status"])["status"] == "pending"  # a read flushes it


def test_held_records_keep_their_submission_order_and_survive_close(tmp_path):
    store = SqliteLog(tmp_path / "t.db", batch_interval=0.01)
    order = []
    for i in range(40):
        msg_id = f"t{i:02d}"
        (queued if i % 2 else submit)(store, msg_id)  # LB tasks held, direct ones not
        order.append(msg_id)
    for msg_id in reversed(order[1::2]):  # engines take them last first
        store.taken(msg_id)
    queued(store, "closing")  # still held when the store closes
    order.append("closing")
    store.close()
    with SqliteLog(tmp_path / "t.db") as again:
        assert again.history() == order


def test_output_that_comes_before_its_record_is_kept(store):
    # a client reports the requests it sent to engines itself after they may have printed
    store.append_output("d1", "stdout", "early ")
    store.flush()
    store.append_output("d1", "stdout", "and more ")
    store.flush()
    submit(store, "d1", engine_id=0)
    store.append_output("d1", "stdout", "then late")
    store.flush()
    assert store.get("d1", ["stdout"])["stdout"] == "early and more then late"
    assert not store._early


def test_put_checks_fields(store):
    with pytest.raises(TypeError, match="bogus"):
        store.put("m", bogus=1)
    with pytest.raises(TypeError, match="engine_id"):
        store.put("m", engine_id="1")
    with pytest.raises(ValueError, match="status"):
        store.put("m", status="done")
    with pytest.raises(ValueError, match="status"):
        store.put("m", status=None)
    with pytest.raises(ValueError, match="submitted"):
        store.put("m", submitted=math.nan)
    with pytest.raises(TypeError, match="after"):
        store.put("m", after=[1])
    with pytest.raises(TypeError):
        store.put("m", request=[object()])
    with pytest.raises(TypeError):
        store.put(b"m", status="ok")  # type: ignore[arg-type]
    store.put("m", submitted=5, after=("a",), request=(b"h", bytearray(b"p"), memoryview(b"x")))
    store.put("m", label="bad \udc80 surrogate", engine_id=None)
    record = store.get("m", ["submitted", "after", "label", "header"])
    assert record == {
        "msg_id": "m",
        "submitted": 5.0,
        "after": ["a"],
        "label": "bad ? surrogate",
        "header": None,  # b"h" is not JSON
    }
    assert store.frames("m", "request") == [b"h", b"p", b"x"]


def test_put_made_checks_only_what_peers_may_send(open_store, tmp_path, caplog):
    """The hub's put: its values are of the right types; their text (a client's label,
    an engine's uuid) may still not be valid Unicode, and frames may be too big or of
    buffers whose len is not their size."""
    store = open_store(blob_threshold=1024, max_frames_bytes=100_000, batch_interval=0.01)
    made = {
        "msg_type": "apply_request",
        "client_uuid": "client-1",
        "label": "bad \udc80 surrogate",
        "status": "pending",
        "submitted": NOW,
        "after": ["a"],
        "follow": [],
        "request": frames("m", {}, memoryview(array.array("q", [1, 2]))),
    }
    store.put_made("m", made, queued=True)
    time.sleep(0.1)
    assert not _in_file(store, "m")  # (held as put_queued holds it)
    store.taken("m")
    big, huge = os.urandom(5_000), bytearray(200_000)
    store.put_made(
        "m",
        {"engine_id": 1, "engine_uuid": None, "status": "ok", "completed": NOW, "result": [big]},
    )
    store.put_made("h", {"msg_type": "\udc80", "status": "error", "result": [huge]})
    record = store.get("m", ["label", "after", "engine_id", "engine_uuid", "status", "buffers"])
    assert record == {
        "msg_id": "m",
        "label": "bad ? surrogate",
        "after": ["a"],
        "engine_id": 1,
        "engine_uuid": None,
        "status": "ok",
        "buffers": [array.array("q", [1, 2]).tobytes()],
    }
    assert store.frames("m", "result") == [big] and _blob_files(tmp_path) == ["1.1"]
    assert store.get("h", ["msg_type", "result_buffers"]) == {
        "msg_id": "h",
        "msg_type": "?",
        "result_buffers": None,
    }
    assert "result of h not stored: 200000 bytes" in caplog.text


def test_a_record_without_fields_is_pending(store):
    store.put("bare")
    assert store.outcome("bare") == "pending"
    assert store.get("bare", ["status", "header", "after", "stdout"]) == {
        "msg_id": "bare",
        "status": "pending",
        "header": None,
        "after": [],
        "stdout": "",
    }
    assert store.frames("bare") is None and store.frames("unknown", "request") is None


def test_query_arguments_are_checked(store):
    with pytest.raises(ValueError, match="limit"):
        store.query({}, limit=-1)
    with pytest.raises(ValueError, match="bogus"):
        store.query({"bogus": 1})
    with pytest.raises(ValueError, match="bogus"):
        store.query({}, keys=["bogus"])
    submit(store, "m", at=NOW)
    when = datetime.fromtimestamp(NOW - 1, timezone.utc)
    assert [r["msg_id"] for r in store.query({"submitted": {"$gt": when}}, ["msg_id"])] == ["m"]


def test_many_small_outputs_keep_their_order(store):
    submit(store, "m")
    for i in range(20_000):
        store.append_output("m", "stdout", f"{i}\n")
    assert store.get("m", ["stdout"])["stdout"] == "".join(f"{i}\n" for i in range(20_000))


def test_reads_see_earlier_puts_from_any_thread(open_store):
    store = open_store(batch_interval=60.0)  # the writer would wait a minute on its own
    submit(store, "main")
    assert store.history() == ["main"]
    done = threading.Event()

    def other() -> None:
        complete(store, "main")
        submit(store, "other")
        done.set()

    thread = threading.Thread(target=other)
    thread.start()
    assert done.wait(10)
    thread.join()
    assert store.outcome("main") == (None, True)
    assert store.history() == ["main", "other"]


def _blob_files(tmp_path) -> list[str]:
    folder = tmp_path / "tasks.db-blobs"
    return sorted(p.name for p in folder.iterdir() if p.name != BLOB_MARKER)


def test_big_frames_go_to_blob_files(open_store, tmp_path):
    store = open_store(blob_threshold=1024)
    submit(store, "small")
    complete(store, "small")
    big = os.urandom(200_000)
    store.put("big", status="pending", request=frames("big", {}, big))
    store.flush()  # (the reply in a later batch: an update names the file by the row's seq)
    store.put("big", status="ok", result=frames("big", {"status": "ok"}, memoryview(big), b"t"))
    store.flush()
    with sqlite3.connect(tmp_path / "tasks.db") as con:
        inline = con.execute("SELECT seq, request_big, result_big FROM tasks").fetchall()
        assert len(con.execute("SELECT request FROM tasks WHERE seq = 2").fetchone()[0]) == 0
    assert inline == [(1, 0, 0), (2, 1, 1)]
    assert _blob_files(tmp_path) == ["2.0", "2.1"]
    assert (tmp_path / "tasks.db-blobs").stat().st_mode & 0o777 == 0o700
    on_disk = sum(p.stat().st_size for p in (tmp_path / "tasks.db-blobs").iterdir())  # (+0)
    assert on_disk > 400_000 and store._blob_bytes == on_disk
    assert store.get("big", ["result_buffers"])["result_buffers"] == [big, b"t"]
    assert store.get("big", ["buffers"])["buffers"] == [big]
    assert store.frames("big", "result") == frames("big", {"status": "ok"}, big, b"t")
    assert store.frames_many(["big", "small"], "request")["big"][4] == big
    # a query weighs the files it would read
    assert store.query_capped({}, ["buffers"], max_bytes=100_000) == (
        [{"msg_id": "small", "buffers": [b"f", b"args"]}],
        True,
    )

    assert store.drop_results(["big", "unknown"]) == 1
    assert _blob_files(tmp_path) == ["2.0"]
    record = store.get("big", ["status", "result_content", "result_buffers", "buffers"])
    assert record == {
        "msg_id": "big",
        "status": "ok",
        "result_content": None,
        "result_buffers": None,
        "buffers": [big],
    }
    assert store.drop_results() == 1  # "small"'s inline result
    assert store.get("small", ["result_header"])["result_header"] is None
    assert store.purge(["big"]) == 1
    assert _blob_files(tmp_path) == [] and store._blob_bytes == 0
    with sqlite3.connect(tmp_path / "tasks.db") as con:
        assert con.execute("SELECT count(*) FROM gone").fetchone() == (0,)


def test_frames_over_the_limit_are_neither_stored_nor_held(open_store, caplog):
    store = open_store(max_frames_bytes=10_000, max_pending_bytes=5_000, batch_interval=60.0)
    huge = bytearray(50_000)
    submit(store, "huge", request=frames("huge", {}, huge))
    complete(store, "huge", result=frames("huge", {"status": "ok"}, huge))
    assert store.blocked_seconds == 0  # (not counted against the bound either)
    record = store.get("huge", ["status", "buffers", "result_buffers"])
    assert record == {"msg_id": "huge", "status": "ok", "buffers": None, "result_buffers": None}
    assert "request of huge not stored: 50" in caplog.text
    assert "result of huge not stored: 50" in caplog.text


def test_blob_files_no_record_names_are_removed_on_open(open_store, tmp_path):
    store = open_store(blob_threshold=1024)
    big = os.urandom(5000)
    for i in range(3):
        submit(store, f"m{i}", request=frames(f"m{i}", {}, big))
    store.close()
    folder = tmp_path / "tasks.db-blobs"
    (folder / "99.0").write_bytes(b"a batch that never committed")
    (folder / "2.1.part").write_bytes(b"cut short")
    store = open_store(blob_threshold=1024)
    assert _blob_files(tmp_path) == ["1.0", "2.0", "3.0"]
    assert store._blob_bytes == sum(p.stat().st_size for p in folder.iterdir())
    assert store.get("m2", ["buffers"])["buffers"] == [big]
    (folder / "1.0").unlink()  # (removed by hand: the record's frames are then missing)
    assert store.get("m0", ["buffers"])["buffers"] is None


V1_SCHEMA = """
CREATE TABLE tasks (
    seq INTEGER PRIMARY KEY, msg_id TEXT NOT NULL UNIQUE,
    msg_type TEXT, client_uuid TEXT, engine_id INTEGER, engine_uuid TEXT, label TEXT,
    status TEXT NOT NULL DEFAULT 'pending',
    submitted REAL, started REAL, completed REAL, received REAL, resubmitted TEXT,
    done_at REAL, request_big INTEGER NOT NULL DEFAULT 0, result_big INTEGER NOT NULL DEFAULT 0,
    after TEXT, follow TEXT, stdout TEXT, stderr TEXT, request BLOB, result BLOB
);
CREATE INDEX tasks_done ON tasks(done_at);
CREATE TABLE blobs (
    msg_id TEXT NOT NULL, kind INTEGER NOT NULL, data BLOB NOT NULL, PRIMARY KEY (msg_id, kind)
);
CREATE TRIGGER tasks_blobs AFTER DELETE ON tasks WHEN old.request_big OR old.result_big
BEGIN DELETE FROM blobs WHERE msg_id = old.msg_id; END;
PRAGMA application_id = 1886929986;
PRAGMA user_version = 1;
"""


def test_a_version_1_file_is_upgraded(tmp_path, open_store):
    from kernel_engine.controller.sqlite_store import pack

    big = frames("old", {}, os.urandom(100_000))
    with sqlite3.connect(tmp_path / "tasks.db") as con:
        con.executescript(V1_SCHEMA)
        con.execute("PRAGMA journal_mode = WAL")
        con.execute(
            "INSERT INTO tasks (msg_id, status, done_at, request_big, request) "
            "VALUES ('old', 'ok', ?1, 1, x''), ('small', 'ok', ?1, 0, ?2)",
            (NOW, pack([b"{}", b"x"])),
        )
        con.execute("INSERT INTO blobs VALUES ('old', 0, ?)", (pack(big),))
    store = open_store()
    assert store.frames("old", "request") == big
    assert store.frames("small", "request") == [b"{}", b"x"]
    assert _blob_files(tmp_path) == ["1.0"]
    with sqlite3.connect(tmp_path / "tasks.db") as con:
        assert con.execute("PRAGMA user_version").fetchone() == (3,)  # (through 2)
        tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master")}
    assert "blobs" not in tables and {"gone", "shared"} <= tables
    assert store.purge() == 2 and _blob_files(tmp_path) == []


V2_SCHEMA = (
    V1_SCHEMA.split("CREATE TABLE blobs")[0]
    + """
CREATE TABLE gone (name TEXT NOT NULL);
CREATE TRIGGER tasks_gone AFTER DELETE ON tasks WHEN old.request_big OR old.result_big
BEGIN
    INSERT INTO gone SELECT old.seq || '.0' WHERE old.request_big;
    INSERT INTO gone SELECT old.seq || '.1' WHERE old.result_big;
END;
PRAGMA application_id = 1886929986;
PRAGMA user_version = 2;
"""
)


def test_a_version_2_file_is_upgraded(tmp_path, open_store):
    from kernel_engine.controller.sqlite_store import pack

    old = frames("old", {}, FUNCTION, b"args")
    with sqlite3.connect(tmp_path / "tasks.db") as con:
        con.executescript(V2_SCHEMA)
        con.execute("PRAGMA journal_mode = WAL")
        con.execute(
            "INSERT INTO tasks (msg_id, status, done_at, request) VALUES ('old', 'ok', ?, ?)",
            (NOW, pack(old)),
        )
    store = open_store()
    assert store.frames("old", "request") == old  # (kept whole, as it was)
    for msg_id in ("new", "newer"):
        submit(store, msg_id, request=frames(msg_id, {}, FUNCTION, b"args"))
        assert store.frames(msg_id, "request") == frames(msg_id, {}, FUNCTION, b"args")
    assert _shared_rows(store) == [1]
    with sqlite3.connect(tmp_path / "tasks.db") as con:
        assert con.execute("PRAGMA user_version").fetchone() == (3,)


FUNCTION = b"a pickled function, the same in every task of a map " * 6


def _shared_rows(store: SqliteLog) -> list[int]:
    """The references of each shared frame in the store's file, once what was put is."""
    store.flush()
    with sqlite3.connect(store.path) as con:
        return [r[0] for r in con.execute("SELECT refs FROM shared ORDER BY id")]


def _map_task(msg_id: str, arg: bytes, function: bytes = FUNCTION) -> list[bytes]:
    """A map's request: the chunk runner by reference, the arguments, the function."""
    return frames(msg_id, {}, b"map_chunk", arg, function)


def test_a_maps_function_is_stored_once(open_store, tmp_path):
    store = open_store(blob_threshold=4096)
    big_arg = os.urandom(10_000)  # (this task's request goes to a blob file)
    sent = {}
    for i in range(50):
        msg_id = f"m{i:02d}"
        sent[msg_id] = _map_task(msg_id, big_arg if i == 7 else b"arg %d" % i)
        submit(store, msg_id, request=sent[msg_id])
        complete(store, msg_id)
    other = _map_task("other", b"arg", FUNCTION[::-1])  # (seen once: not shared)
    submit(store, "other", request=other)
    assert _shared_rows(store) == [49]  # (the first task's has it inline)
    assert _blob_files(tmp_path) == ["8.0"]
    for msg_id, request in sent.items():
        assert store.frames(msg_id, "request") == request
    assert store.frames_many(["m07", "other"], "request") == {"m07": sent["m07"], "other": other}
    rows = store.query({"msg_id": {"$in": ["m03", "m07"]}}, ["buffers", "result_content"])
    assert [r["buffers"] for r in rows] == [
        [b"map_chunk", b"arg 3", FUNCTION],
        [b"map_chunk", big_arg, FUNCTION],
    ]
    with sqlite3.connect(tmp_path / "tasks.db") as con:
        inline = dict(con.execute("SELECT msg_id, request FROM tasks WHERE request NOT NULL"))
    assert FUNCTION in inline["m00"] and FUNCTION not in inline["m03"]
    assert store.purge(msg_ids=[f"m{i:02d}" for i in range(49)]) == 49
    assert _shared_rows(store) == [1]
    store.close()
    # another controller on the same file finds the function by its digest
    store = open_store()
    for msg_id in ("again", "again2"):
        submit(store, msg_id, request=_map_task(msg_id, b"x"))
        complete(store, msg_id)
        assert store.frames(msg_id, "request") == _map_task(msg_id, b"x")
    assert _shared_rows(store) == [2]
    assert store.purge() == 3  # ("other" is pending)
    assert _shared_rows(store) == []
    for msg_id in ("after", "after2"):  # (stored anew)
        submit(store, msg_id, request=_map_task(msg_id, b"y"))
        assert store.frames(msg_id, "request") == _map_task(msg_id, b"y")
    assert _shared_rows(store) == [1]


def test_shared_frames_go_with_the_records_retention_deletes(open_store):
    store = open_store(max_age=60.0, maintenance_interval=0.05)
    for i in range(20):
        submit(store, f"old{i}", request=_map_task(f"old{i}", b"arg"))
        complete(store, f"old{i}", at=NOW - 3600)
    for msg_id in ("new", "newer"):
        submit(store, msg_id, request=_map_task(msg_id, b"arg", FUNCTION[::-1]))
        complete(store, msg_id)
    store.flush()
    assert wait_until(lambda: store.count() == 2)
    assert wait_until(lambda: _shared_rows(store) == [1])
    assert store.frames("newer", "request") == _map_task("newer", b"arg", FUNCTION[::-1])


def test_many_records_of_one_shape_in_one_batch(open_store, caplog):
    # (the writer upserts them 1 to _CHUNK at a time: 1,000 puts of each shape take
    # statements of every size, and a duplicate among them is still found)
    from kernel_engine.controller.sqlite_store import _CHUNK

    store = open_store(batch_interval=3600.0, max_pending=10_000)
    submit(store, "dup")
    store.flush()
    n = 10 * _CHUNK + 11
    ids = [f"m{i:04d}" for i in range(n)]
    for i, msg_id in enumerate(ids):
        store.put_queued(
            msg_id,
            msg_type="apply_request",
            client_uuid="c",
            status="pending",
            submitted=NOW + i,
            after=[],
            follow=["dup"] if i % 7 == 0 else [],
            request=_map_task(msg_id, b"arg %d" % i),
        )
        store.taken(msg_id)
        if i % 2:
            complete(store, msg_id, at=NOW + i)
    submit(store, "dup", label="another")  # (a new record reusing a msg_id)
    for msg_id in ids[::2]:
        complete(store, msg_id, status="error", at=NOW)
    records = store.get_many(ids, ["status", "submitted", "completed", "follow", "buffers"])
    assert len(records) == n
    for i, msg_id in enumerate(ids):
        record = records[msg_id]
        assert record["status"] == ("ok" if i % 2 else "error")
        assert record["submitted"] == NOW + i
        assert record["completed"] == (NOW + i if i % 2 else NOW)
        assert record["follow"] == (["dup"] if i % 7 == 0 else [])
        assert record["buffers"] == [b"map_chunk", b"arg %d" % i, FUNCTION]
    assert "reused msg_id dup" in caplog.text
    assert store.get("dup", ["label"]) == {"msg_id": "dup", "label": None}
    assert _shared_rows(store) == [n - 1]  # (the first task's has it inline)


def test_frames_of_other_buffers_are_stored_by_their_bytes(open_store, tmp_path):
    import array

    store = open_store(blob_threshold=1024)
    numbers = array.array("d", [1.5, 2.5])  # (its len counts items, not bytes)
    store.put("m", status="ok", result=frames("m", {}, memoryview(numbers), numbers))
    wide = array.array("d", range(200))  # (1,600 bytes, but a len of 200: a blob file)
    store.put("w", status="ok", result=frames("w", {}, wide))
    strided = memoryview(b"abcdef")[::2]  # (not contiguous: not stored)
    store.put("s", status="ok", result=frames("s", {}, strided))
    assert store.frames("m") == frames("m", {}, numbers.tobytes(), numbers.tobytes())
    assert store.frames("w") == frames("w", {}, wide.tobytes())
    assert _blob_files(tmp_path) == ["2.1"]
    assert store.frames("s") is None
    assert store.get("s", ["status"]) == {"msg_id": "s", "status": "ok"}


def test_a_request_too_big_only_with_its_shared_buffer_goes_inline(open_store, tmp_path):
    function = os.urandom(3000)
    store = open_store(blob_threshold=4096)
    for msg_id in ("a", "b"):
        submit(store, msg_id, request=_map_task(msg_id, os.urandom(2000), function))
    store.flush()
    assert _blob_files(tmp_path) == ["1.0"]  # (the first: its function was not seen yet)
    assert _shared_rows(store) == [1]
    assert store.frames("b", "request")[-1] == function


def test_a_duplicate_record_adds_no_reference(open_store, caplog):
    store = open_store()
    submit(store, "first", request=_map_task("first", b"arg"))
    submit(store, "dup", request=_map_task("dup", b"first"))
    store.flush()
    submit(store, "dup", request=_map_task("dup", b"second"))  # (not written)
    submit(store, "new", request=_map_task("new", b"arg"))
    store.flush()
    assert "reused msg_id dup" in caplog.text
    assert _shared_rows(store) == [2]
    assert store.frames("dup", "request") == _map_task("dup", b"first")
    complete(store, "new")  # ("dup" stays pending: what is put for a reused id is not written)
    assert store.purge() == 1 and _shared_rows(store) == [1]


def test_which_frames_are_shared(open_store, tmp_path):
    store = open_store(blob_threshold=4096)
    small = frames("small", {}, b"f" * 255, b"arg")  # (too small to be worth a row)
    big = frames("big", {}, os.urandom(5000), b"arg")  # (a closure over data: its file)
    late = frames("late", {}, b"1", b"2", b"3", b"4", FUNCTION)  # (past the first four)
    execute = frames("execute", {"code": "1"})  # (no buffers)
    for request in (small, big, late, execute):
        for msg_id in ("a", "b"):  # (each seen twice)
            submit(store, msg_id + request[0].decode(), request=request)
            assert store.frames(msg_id + request[0].decode(), "request") == request
    assert _shared_rows(store) == []
    assert len(_blob_files(tmp_path)) == 2


def test_a_shared_function_counts_once_against_the_limit(open_store):
    store = open_store(max_bytes=16 << 20, batch_interval=0.01)
    for i in range(200):  # (history that must stay)
        submit(store, f"old{i}", at=NOW + i)
        complete(store, f"old{i}", at=NOW + i)
    function = os.urandom(40 << 10)  # (a closure over 40 KiB: 300 tasks would be 12 MiB)
    for i in range(300):
        submit(store, f"m{i}", request=_map_task(f"m{i}", b"arg", function))
    assert store.count() == 500 and _shared_rows(store) == [299]
    assert store.size_bytes() < 4 << 20


def test_shared_ids_are_never_used_again(open_store, tmp_path):
    store = open_store()
    for msg_id in ("a", "b", "c"):
        submit(store, msg_id, request=_map_task(msg_id, b"arg"))
        complete(store, msg_id)
    assert store.purge(msg_ids=["a", "b"]) == 2 and _shared_rows(store) == [1]
    with sqlite3.connect(tmp_path / "tasks.db") as con:
        (first,) = con.execute("SELECT id FROM shared").fetchone()
    assert store.purge() == 1 and _shared_rows(store) == []
    for msg_id in ("d", "e"):  # (the same function: a row of its own, a new id)
        submit(store, msg_id, request=_map_task(msg_id, b"arg"))
    store.flush()
    with sqlite3.connect(tmp_path / "tasks.db") as con:
        assert con.execute("SELECT id FROM shared").fetchall() == [(first + 1,)]


def test_crafted_shared_names_read_as_missing_frames(open_store, tmp_path, caplog):
    store = open_store()
    for msg_id in ("a", "b", "c"):
        submit(store, msg_id, request=_map_task(msg_id, b"arg"))
        complete(store, msg_id)
    store.close()
    with sqlite3.connect(tmp_path / "tasks.db") as con:
        con.execute("UPDATE tasks SET request_shared = -3 WHERE msg_id = 'b'")
        con.execute("UPDATE tasks SET request_shared_at = 'x' WHERE msg_id = 'c'")
    store = open_store()
    assert store.frames("a", "request") == _map_task("a", b"arg")
    assert store.frames_many(["b", "c"], "request") == {}
    rows = store.query({}, ["buffers"])
    assert [r["buffers"] is None for r in rows] == [False, True, True]
    assert caplog.text.count("shared frame is missing") >= 4


def test_a_planted_digest_is_not_trusted(open_store, tmp_path, caplog):
    import hashlib

    store = open_store()
    submit(store, "first", request=_map_task("first", b"arg"))
    store.close()
    with sqlite3.connect(tmp_path / "tasks.db") as con:  # (the function's digest, other bytes)
        digest = hashlib.blake2b(FUNCTION, digest_size=32).digest()
        con.execute("INSERT INTO shared (digest, refs, data) VALUES (?, 1, ?)", (digest, b"evil"))
    store = open_store()
    for msg_id in ("a", "b"):
        submit(store, msg_id, request=_map_task(msg_id, b"arg"))
    assert store.frames("b", "request") == _map_task("b", b"arg")
    assert "is not what its digest says" in caplog.text


def test_a_missing_shared_frame_is_missing_frames_not_an_error(open_store, tmp_path, caplog):
    store = open_store()
    for msg_id in ("first", "m"):
        submit(store, msg_id, request=_map_task(msg_id, b"arg"))
        complete(store, msg_id)
    store.close()
    with sqlite3.connect(tmp_path / "tasks.db") as con:  # (a crafted or damaged file)
        con.execute("DROP TRIGGER shared_gone")
        con.execute("DELETE FROM shared")
        con.execute("UPDATE tasks SET request_shared_at = 99 WHERE msg_id = 'first'")
    store = open_store()
    assert store.frames("m", "request") is None
    assert store.get("m", ["buffers", "status"]) == {"msg_id": "m", "buffers": None, "status": "ok"}
    assert "shared frame is missing" in caplog.text
    assert store.frames("first", "request") == _map_task("first", b"arg")  # (none shared)


def test_retention_counts_the_blob_files(open_store, tmp_path):
    limit = 4 << 20
    store = open_store(max_bytes=limit, batch_interval=0.01, blob_threshold=1024)
    payload = os.urandom(100_000)
    for i in range(300):
        msg_id = f"m{i:04d}"
        submit(store, msg_id, at=NOW + i)
        complete(store, msg_id, at=NOW + i, result=frames(msg_id, {"status": "ok"}, payload))
        if i % 20 == 19:
            store.flush()
            assert store.size_bytes() <= limit, i
    files = _blob_files(tmp_path)
    assert 10 < len(files) < 40
    assert store.count() == len(files)  # (each remaining record has its file, and no more)
    assert store.history()[-1] == "m0299"


@pytest.mark.parametrize("limit", [512 << 10, 1 << 30])
def test_a_small_limit_keeps_small_pages_and_is_kept(open_store, tmp_path, limit):
    """A new file has 16 KiB pages (fewer WAL frames a commit), but under
    ``SMALL_LIMIT`` SQLite's 4 KiB: a commit touches the table's page and each index's,
    which with 16 KiB pages took the WAL past a 512 KiB limit and kept a third of the
    records (found by review)."""
    store = open_store(max_bytes=limit, batch_interval=0.01)
    page = sqlite3.connect(tmp_path / "tasks.db").execute("PRAGMA page_size").fetchone()[0]
    assert page == (4096 if limit < SMALL_LIMIT else PAGE_SIZE)
    payload = os.urandom(200)
    for i in range(3000):
        msg_id = f"m{i:05d}"
        submit(store, msg_id, at=NOW + i, request=frames(msg_id, {}, payload))
        complete(store, msg_id, at=NOW + i, result=frames(msg_id, {"status": "ok"}, b"r"))
        if i % 500 == 499:
            store.flush()
            assert store.size_bytes() <= limit, (i, store.size_bytes())
    assert store.count() > (300 if limit < SMALL_LIMIT else 2999)


def test_history_in_submission_order(open_store):
    store = open_store(batch_interval=0.001)
    order = []
    for i in range(300):
        msg_id = f"task-{299 - i:03d}"  # not sorted by name
        if i % 3:
            submit(store, msg_id)
        else:  # another set of fields first: another statement in the batch
            store.put(msg_id, status="pending", engine_id=i % 4, submitted=NOW)
        order.append(msg_id)
        if i % 7 == 0 and i > 10:
            complete(store, order[i - 10])
        if i == 150:
            store.flush()
    assert store.history() == order
    assert [r["msg_id"] for r in store.query({}, ["msg_id"], limit=5)] == order[:5]
    assert store.count() == 300


def test_purge_never_touches_pending(store):
    for i in range(6):
        submit(store, f"m{i}", engine_id=i % 2)
    for i in (0, 1, 2, 3):
        complete(store, f"m{i}", status="error" if i == 3 else "ok")
    assert store.purge(["m0", "m4", "unknown"]) == 1  # m4 is pending
    assert store.purge(engine_ids=[1]) == 2  # m1, m3; m5 is pending
    assert store.history() == ["m2", "m4", "m5"]
    assert store.purge() == 1
    assert store.history() == ["m4", "m5"]
    assert [r["msg_id"] for r in store.pending(["status"])] == ["m4", "m5"]
    with pytest.raises(TypeError):
        store.purge(engine_ids=["1"])  # type: ignore[list-item]


def test_output_is_bounded(store):
    submit(store, "m")
    store.append_output("m", "stdout", "x" * (MAX_OUTPUT - 10))
    store.append_output("m", "stdout", "y" * 100)
    store.flush()
    store.append_output("m", "stdout", "z" * 100)
    store.append_output("nobody", "stdout", "lost")
    out = store.get("m", ["stdout"])["stdout"]
    assert out == "x" * (MAX_OUTPUT - 10) + "y" * 10 + TRUNCATED
    assert store.get("nobody") is None
    with pytest.raises(ValueError):
        store.append_output("m", "stdin", "x")


def test_retention_by_age_while_running(open_store):
    store = open_store(max_age=60.0, maintenance_interval=0.05)
    submit(store, "old-pending", at=NOW - 3600)
    submit(store, "old")
    complete(store, "old", at=NOW - 3600)
    submit(store, "new")
    complete(store, "new")
    assert wait_until(lambda: store.count() == 2)
    assert store.history() == ["old-pending", "new"]


def test_retention_by_age_on_reopen(open_store):
    store = open_store(max_age=None)
    submit(store, "old")
    complete(store, "old", at=NOW - 8 * 86400)
    submit(store, "new")
    complete(store, "new")
    store.close()
    assert open_store(max_age=7 * 86400).history() == ["new"]


def test_retention_keeps_the_file_under_max_bytes(open_store):
    limit = 4 << 20
    store = open_store(max_bytes=limit, batch_interval=0.01)
    payload = os.urandom(200)
    largest = 0
    for chunk in range(50):
        for i in range(chunk * 1000, (chunk + 1) * 1000):
            msg_id = f"{i:08d}-0000-4000-8000-000000000000"
            store.put(
                msg_id,
                msg_type="apply_request",
                client_uuid="c",
                status="pending",
                submitted=NOW + i,
                request=frames(msg_id, {}, payload),
            )
            if i % 100:  # one in a hundred stays pending
                complete(store, msg_id, at=NOW + i)
        store.flush()
        largest = max(largest, store.size_bytes())
        assert store.size_bytes() <= limit, chunk
    history = store.history()
    assert 2_000 < len(history) < 50_000
    assert history[-1].startswith("00049999")  # the newest stay
    assert len(store.pending()) == 500  # every pending record stays
    assert largest > 0.8 * limit


def test_lower_limit_on_reopen_gives_space_back(open_store):
    store = open_store(max_bytes=None)
    for i in range(3000):
        submit(store, f"m{i}")
        store.put(f"m{i}", status="ok", completed=NOW + i, result=[os.urandom(2000)])
    store.close()
    assert store.size_bytes() > 6 << 20
    store = open_store(max_bytes=2 << 20)
    assert 0 < store.count() < 3000
    assert store.size_bytes() <= 2 << 20
    assert store.history()[-1] == "m2999"


def test_purge_gives_space_back(open_store):
    store = open_store(maintenance_interval=0.05)
    for i in range(2000):
        store.put(f"m{i}", status="ok", completed=NOW, result=[os.urandom(2000)])
    store.flush()
    full = store.size_bytes()
    assert store.purge() == 2000
    assert wait_until(lambda: store.size_bytes() < full / 4)


def test_backpressure_blocks_the_caller_and_loses_nothing(open_store):
    store = open_store(batch_interval=60.0, max_pending=100, max_pending_bytes=10_000)
    for i in range(1000):
        store.put(f"m{i}", status="ok", completed=NOW, result=[b"x" * 50])
    assert store.count() == 1000
    assert store.blocked_seconds > 0


CHILD = """
import os, sys, time
from kernel_engine.controller.sqlite_store import SqliteLog
store = SqliteLog(sys.argv[1], batch_interval=0.01)
now = time.time()
for batch in range(5):
    for i in range(200):
        msg_id = f"b{batch}-{i}"
        store.put(msg_id, msg_type="apply_request", client_uuid="c", submitted=now,
                  request=[b"{}", b"{}", b"{}", b"{}", os.urandom(100)])
        store.put(msg_id, status="ok", completed=now, result=[b"{}", b"{}", b"{}", b"{}"])
    assert store.flush(10)
for i in range(5000):  # these may or may not be committed
    store.put(f"late-{i}", status="pending", request=[os.urandom(1000)])
print("committed", flush=True)
time.sleep(60)
"""


def test_sigkill_keeps_every_committed_batch(tmp_path, open_store):
    path = tmp_path / "tasks.db"
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(path)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "committed"
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(10)
        if child.stdout is not None:
            child.stdout.close()
    store = open_store()
    history = store.history()
    assert history[:1000] == [f"b{b}-{i}" for b in range(5) for i in range(200)]
    assert all(m.startswith("late-") for m in history[1000:])
    assert store.query({"status": "ok"}, ["msg_id"], limit=None).__len__() == 1000
    record = store.get("b4-199", ["buffers", "result_content", "submitted", "completed"])
    assert record is not None and len(record["buffers"][0]) == 100
    assert record["result_content"] == {} and record["completed"] == record["submitted"]


def test_close_joins_the_writer(tmp_path):
    store = SqliteLog(tmp_path / "tasks.db")
    submit(store, "m")
    store.close()
    store.close()
    assert not [t for t in threading.enumerate() if t.name == "px-store-writer"]
    with pytest.raises(StoreError, match="closed"):
        submit(store, "n")
    with pytest.raises(StoreError, match="closed"):
        store.history()
    with SqliteLog(tmp_path / "tasks.db") as again:
        assert again.history() == ["m"]


def test_writer_failure_is_surfaced(tmp_path, open_store, caplog):
    path = tmp_path / "tasks.db"
    store = open_store()
    submit(store, "m")
    store.flush()
    with sqlite3.connect(path) as con:
        con.execute("DROP TABLE tasks")
    submit(store, "n")
    with pytest.raises(StoreError, match=str(path)):
        store.flush(10)
    with pytest.raises(StoreError, match="writer failed"):
        submit(store, "o")
    assert "the writer failed" in caplog.text
    with pytest.raises(StoreError):
        store.close()
    store.close()
    assert not [t for t in threading.enumerate() if t.name == "px-store-writer"]


def test_bad_files_are_named(tmp_path, open_store):
    garbage = tmp_path / "garbage.db"
    garbage.write_bytes(os.urandom(8192))
    with pytest.raises(StoreError, match=str(garbage)):
        SqliteLog(garbage)

    foreign = tmp_path / "foreign.db"
    with sqlite3.connect(foreign) as con:
        con.execute("CREATE TABLE tasks (x)")
    with pytest.raises(StoreError, match="not a jupyter-px task database"):
        SqliteLog(foreign)

    torn = tmp_path / "torn.db"
    store = open_store("torn.db", max_bytes=None)
    for i in range(2000):
        submit(store, f"m{i}", label="x" * 200)
    store.close()
    data = bytearray(torn.read_bytes())
    data[len(data) // 2 :] = os.urandom(len(data) - len(data) // 2)
    torn.write_bytes(bytes(data))
    with pytest.raises(StoreError, match=f"{torn}.*(damaged|malformed)"):
        SqliteLog(torn)
    assert not [t for t in threading.enumerate() if t.name == "px-store-writer"]


def test_new_file_is_private(tmp_path, open_store):
    open_store()
    assert (tmp_path / "tasks.db").stat().st_mode & 0o777 == 0o600


def test_a_blob_folder_that_is_a_link_is_refused_and_left_alone(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "1.0").write_bytes(b"somebody's file")
    (tmp_path / "tasks.db-blobs").symlink_to(elsewhere)
    with pytest.raises(StoreError, match=r"tasks\.db-blobs is not a directory of this user"):
        SqliteLog(tmp_path / "tasks.db")
    assert (elsewhere / "1.0").read_bytes() == b"somebody's file"
    (tmp_path / "tasks.db-blobs").unlink()
    (tmp_path / "tasks.db-blobs").mkdir(mode=0o777)
    os.chmod(tmp_path / "tasks.db-blobs", 0o777)  # (not the umask's)
    with pytest.raises(StoreError, match="only it can write to"):
        SqliteLog(tmp_path / "tasks.db")
    assert not [t for t in threading.enumerate() if t.name == "px-store-writer"]
    os.chmod(tmp_path / "tasks.db-blobs", 0o700)
    # a folder of that name with someone's files in it, not made by a store: refused
    (tmp_path / "tasks.db-blobs" / "1.0").write_bytes(b"somebody's file")
    with pytest.raises(StoreUnusable, match="not this database's blob folder"):
        SqliteLog(tmp_path / "tasks.db")
    assert (tmp_path / "tasks.db-blobs" / "1.0").read_bytes() == b"somebody's file"
    # ours (its marker): what is not a blob file stays, whatever a record names
    (tmp_path / "tasks.db-blobs" / BLOB_MARKER).touch()
    (tmp_path / "tasks.db-blobs" / "notes.txt").write_bytes(b"not a blob file")
    (tmp_path / "tasks.db-blobs" / "7.1").mkdir()
    store = SqliteLog(tmp_path / "tasks.db")
    store.close()
    assert (tmp_path / "tasks.db-blobs" / "notes.txt").exists()
    assert (tmp_path / "tasks.db-blobs" / "7.1").is_dir()
    assert not (tmp_path / "tasks.db-blobs" / "1.0").exists()  # (an orphan of ours)


def test_names_from_a_crafted_file_never_reach_outside_the_blob_folder(tmp_path, open_store):
    from kernel_engine.controller.sqlite_store import _SCHEMA

    victim = tmp_path / "victim.0"
    victim.write_bytes(b"keep me")
    with sqlite3.connect(tmp_path / "tasks.db") as con:  # (its seq a text: a path)
        con.executescript(_SCHEMA.replace("seq INTEGER PRIMARY KEY", "seq TEXT PRIMARY KEY"))
        con.execute(
            "INSERT INTO tasks (seq, msg_id, request_big) VALUES (?, 'm', 1)",
            (str(tmp_path / "victim"),),
        )
        con.executemany(
            "INSERT INTO gone VALUES (?)", [(str(victim),), ("../victim.0",), ("1.0/../x",)]
        )
    store = open_store(blob_threshold=1024)
    assert victim.read_bytes() == b"keep me"
    assert store.frames("m", "request") is None
    with sqlite3.connect(tmp_path / "tasks.db") as con:
        assert con.execute("SELECT count(*) FROM gone").fetchone() == (0,)


def test_a_crafted_version_1_file_writes_only_blob_files(tmp_path, open_store):
    from kernel_engine.controller.sqlite_store import pack

    with sqlite3.connect(tmp_path / "tasks.db") as con:
        con.executescript(V1_SCHEMA.replace("seq INTEGER PRIMARY KEY", "seq TEXT PRIMARY KEY"))
        con.execute(
            "INSERT INTO tasks (seq, msg_id, status, done_at, request_big) "
            "VALUES (?, 'evil', 'ok', ?, 1)",
            (str(tmp_path / "x"), NOW),
        )
        con.execute("INSERT INTO blobs VALUES ('evil', '/../y', ?)", (pack([b"z"]),))
    open_store()
    assert _blob_files(tmp_path) == []
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith("tasks.db")) == []


def test_unreadable_blob_files_are_missing_frames_not_errors(open_store, tmp_path):
    store = open_store(blob_threshold=1024)
    for i in range(3):
        submit(store, f"m{i}", request=frames(f"m{i}", {}, os.urandom(5000)))
    store.flush()
    folder = tmp_path / "tasks.db-blobs"
    (folder / "1.0").write_bytes(b"")  # (a power loss: the row reached the disk, not it)
    (folder / "2.0").write_bytes((folder / "2.0").read_bytes()[:-10])  # cut short
    (folder / "3.0").unlink()
    os.mkfifo(folder / "3.0")  # (would block a reader that waited on it)
    assert store.frames_many(["m0", "m1", "m2"], "request") == {}
    assert store.query({}, ["msg_id", "buffers"]) == [
        {"msg_id": f"m{i}", "buffers": None} for i in range(3)
    ]


def test_a_blob_file_that_cannot_be_removed_leaves_the_writer_working(open_store, tmp_path):
    store = open_store(blob_threshold=1024)
    submit(store, "m", request=frames("m", {}, os.urandom(5000)))
    complete(store, "m")
    store.flush()
    (tmp_path / "tasks.db-blobs" / "1.0").unlink()
    (tmp_path / "tasks.db-blobs" / "1.0").mkdir()  # (unlink fails: a directory)
    (tmp_path / "tasks.db-blobs" / "1.0" / "x").touch()
    assert store.purge(["m"]) == 1
    submit(store, "after")
    assert store.history() == ["after"]


def test_one_big_reply_does_not_take_every_other_record_with_it(open_store):
    limit = 16 << 20
    store = open_store(max_bytes=limit, blob_threshold=1024, batch_interval=0.01)
    assert store.max_frames_bytes == limit // 8  # (one record: at most an eighth)
    for i in range(2000):
        submit(store, f"m{i:04d}", at=NOW + i)
        complete(store, f"m{i:04d}", at=NOW + i, result=frames("r", {}, os.urandom(3000)))
    store.flush()
    before = store.count()
    assert before > 1000
    complete(store, "big", result=frames("big", {}, os.urandom(limit // 8 - 1000)))
    store.flush()
    assert store.get("big", ["result_buffers"])["result_buffers"] is not None
    assert store.count() > before * 0.6, (before, store.count())
    assert store.size_bytes() <= limit


def test_a_blob_file_is_read_only_for_its_own_record(open_store, tmp_path, caplog):
    store = open_store(blob_threshold=1024)
    submit(store, "alice", request=frames("alice", {}, os.urandom(5000)))
    store.close()
    # (as a database restored from an older copy would: its record numbered as alice's)
    with sqlite3.connect(tmp_path / "tasks.db") as con:
        con.execute("UPDATE tasks SET msg_id = 'bob' WHERE msg_id = 'alice'")
    store = open_store(blob_threshold=1024)
    assert store.frames("bob", "request") is None
    assert "another record's file" in caplog.text
