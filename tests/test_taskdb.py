"""The task database from clients: queries, history, other clients' results, resubmit,
purges (issue: the task database), with the SQLite store and the in-memory one."""

from __future__ import annotations

import os
import sqlite3
import time
from datetime import datetime, timedelta, timezone

import pytest

import jupyter_ext as jx
from kernel_engine import protocol


@pytest.fixture(scope="module", params=["sqlite", "memory"])
def db_rc(request):
    from conftest import ClusterFactory

    factory = ClusterFactory()
    _, client = factory.start(2, db=request.param)
    client.db_kind = request.param
    yield client
    factory.stop_all()


def _finished_work(rc):
    lv = rc.load_balanced_view()
    lv.set_flags(label="squares")
    ar = lv.map(lambda x: x * x, range(6), chunksize=1)
    assert ar.get(30) == [x * x for x in range(6)]
    lv.set_flags(label=None)
    printed = rc[0].apply_async(lambda: print("to the record") or 7)
    assert printed.get(10) == 7
    return ar, printed


def test_queries_with_every_operator(db_rc):
    rc = db_rc
    before = datetime.now(timezone.utc) - timedelta(seconds=1)
    ar, _ = _finished_work(rc)
    ids = set(ar.msg_ids)
    labelled = rc.db_query({"label": "squares"}, keys=["msg_id", "engine_id", "completed"])
    assert ids <= {r["msg_id"] for r in labelled}
    assert all(isinstance(r["completed"], datetime) for r in labelled)
    assert set(labelled[0]) == {"msg_id", "engine_id", "completed"}
    some = sorted(ids)[:2]
    assert {r["msg_id"] for r in rc.db_query({"msg_id": {"$in": some}}, ["msg_id"])} == set(some)
    rest = rc.db_query({"msg_id": {"$nin": some}, "label": "squares"}, ["msg_id"])
    assert ids - set(some) <= {r["msg_id"] for r in rest} and not set(some) & {
        r["msg_id"] for r in rest
    }
    recent = rc.db_query({"completed": {"$gt": before}}, ["msg_id"])
    assert ids <= {r["msg_id"] for r in recent}
    assert rc.db_query({"completed": {"$lt": before}, "label": "squares"}, ["msg_id"]) == []
    assert ids <= {
        r["msg_id"]
        for r in rc.db_query(
            {"submitted": {"$gte": before, "$lte": datetime.now(timezone.utc)}}, ["msg_id"]
        )
    }
    on_zero = rc.db_query({"engine_id": {"$eq": 0}, "label": "squares"}, ["engine_id"])
    on_other = rc.db_query({"engine_id": {"$ne": 0}, "label": "squares"}, ["engine_id"])
    assert {r["engine_id"] for r in on_zero} <= {0} and 0 not in {r["engine_id"] for r in on_other}
    assert len(on_zero) + len(on_other) >= 6
    with pytest.raises(Exception, match=r"\$regex"):
        rc.db_query({"label": {"$regex": "sq"}})
    with pytest.raises(Exception, match="nokey"):
        rc.db_query({"nokey": 1})
    with pytest.raises(TypeError):
        rc.db_query("label == 'squares'")


def test_default_keys_leave_out_buffers_and_buffers_come_as_bytes(db_rc):
    rc = db_rc
    ar = rc.load_balanced_view().apply_async(lambda b: b[::-1], b"abc")
    assert ar.get(10) == b"cba"
    (record,) = rc.db_query({"msg_id": ar.msg_ids[0]})
    assert "buffers" not in record and "result_buffers" not in record
    assert record["status"] == "ok" and record["header"]["msg_id"] == ar.msg_ids[0]
    assert record["content"] is not None and record["result_header"]["msg_type"] == "apply_reply"
    (raw,) = rc.db_query({"msg_id": ar.msg_ids[0]}, keys=["buffers", "result_buffers"])
    assert raw["buffers"] and all(isinstance(b, bytes) for b in raw["buffers"])
    assert raw["result_buffers"] and all(isinstance(b, bytes) for b in raw["result_buffers"])


def test_output_is_kept_with_the_record(db_rc):
    rc = db_rc
    _, printed = _finished_work(rc)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        (record,) = rc.db_query({"msg_id": printed.msg_ids[0]}, ["stdout"])
        if record["stdout"]:
            break
        time.sleep(0.1)
    assert record["stdout"] == "to the record\n"


def test_dependencies_and_engine_are_in_the_record(db_rc):
    rc = db_rc
    lv = rc.load_balanced_view()
    first = lv.apply_async(abs, -1)
    first.get(10)
    with lv.temp_flags(after=first, follow=first):
        second = lv.apply_async(abs, -2)
    second.get(10)
    ids = first.msg_ids + second.msg_ids
    keys = ["msg_id", "after", "follow", "engine_uuid"]
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:  # (until the file has the replies)
        got = {r["msg_id"]: r for r in rc.db_query({"msg_id": {"$in": ids}}, keys)}
        if len(got) == 2 and all(r["engine_uuid"] for r in got.values()):
            break
        time.sleep(0.1)
    assert (got[ids[0]]["after"], got[ids[0]]["follow"]) == ([], [])
    assert (got[ids[1]]["after"], got[ids[1]]["follow"]) == (first.msg_ids, first.msg_ids)
    for msg_id in ids:
        assert got[msg_id]["engine_uuid"] == rc.metadata[msg_id]["engine_uuid"]


def test_history_is_in_submission_order(db_rc):
    rc = db_rc
    lv = rc.load_balanced_view()
    first = lv.apply_async(time.sleep, 0.2)
    second = lv.apply_async(lambda: 1)
    third = rc[1].apply_async(lambda: 2)
    for ar in (first, second, third):
        ar.get(10)
    history = rc.hub_history()
    at = [history.index(ar.msg_ids[0]) for ar in (first, second, third)]
    assert at == sorted(at)


def test_another_client_gets_results_with_their_metadata(db_rc):
    rc = db_rc
    ar = rc.load_balanced_view().apply_async(lambda: (time.sleep(0.1), os.getpid())[1])
    pid = ar.get(10)
    other = jx.Client(rc.connection_file)
    try:
        hub_ar = other.get_result(ar.msg_ids[0])
        assert isinstance(hub_ar, jx.AsyncHubResult)
        assert hub_ar.get(10) == pid
        assert hub_ar.engine_id == ar.engine_id
        assert hub_ar.completed >= hub_ar.started >= hub_ar.submitted
        assert hub_ar.elapsed >= 0.1
        status = other.result_status(ar.msg_ids, status_only=False)
        assert status["completed"] == ar.msg_ids and status[ar.msg_ids[0]] == pid
        running = rc.load_balanced_view().apply_async(time.sleep, 1)
        rc.queue_status()  # (a round trip on rc's socket: the controller has the task now)
        live = other.get_result(running.msg_ids[0])
        assert other.result_status(running.msg_ids)["pending"] == running.msg_ids
        assert live.get(10) is None  # a live task of another client, waited for
    finally:
        other.close()


def test_another_client_gets_a_result_too_big_for_memory_from_the_file(db_rc):
    """A result over the bound of one kept in memory (1 MiB) is in the file; the record in
    memory, without it, answered another client's get_result with no result (None)."""
    if db_rc.db_kind == "memory":
        pytest.skip("the in-memory store keeps no result over its bound")
    ar = db_rc.load_balanced_view().apply_async(bytes, 3 << 20)
    assert len(ar.get(10)) == 3 << 20
    other = jx.Client(db_rc.connection_file)
    try:
        assert other.get_result(ar.msg_ids[0]).get(10) == bytes(3 << 20)
    finally:
        other.close()


def test_received_is_when_the_reply_came_in_both_stores(db_rc):
    """The in-memory store's ``received`` was the engine's ``completed``; it is when the
    controller had the reply, as the file's is (later, by the reply's way here)."""
    ar = db_rc.load_balanced_view().apply_async(abs, -1)
    assert ar.get(10) == 1
    [row] = db_rc.db_query({"msg_id": ar.msg_ids[0]}, keys=["completed", "received"])
    assert row["received"] > row["completed"]


def test_result_status_names_tasks_nobody_knows(db_rc):
    """A msg_id the controller has no record of, and this client is not waiting for, is
    an error that names it (as in IPython Parallel), not a task pending for ever."""
    rc = db_rc
    done = rc.load_balanced_view().apply_async(lambda: 1)
    done.get(10)
    nobody = "0123456789abcdef0123456789abcdef"
    with pytest.raises(KeyError, match=nobody):
        rc.result_status([*done.msg_ids, nobody])
    with pytest.raises(KeyError, match="and 2 more"):
        rc.result_status([f"{i:032x}" for i in range(7)])
    assert rc.result_status(done.msg_ids)["completed"] == done.msg_ids


def test_resubmit_runs_finished_tasks_again(db_rc):
    rc = db_rc
    lv = rc.load_balanced_view()
    ar = lv.map(lambda x: x + 100, range(3), chunksize=1)
    assert ar.get(10) == [100, 101, 102]
    again = rc.resubmit(ar.msg_ids)
    assert isinstance(again, jx.AsyncHubResult)
    assert again.get(10) == [[100], [101], [102]] or again.get(10) == [100, 101, 102]
    assert not set(again.msg_ids) & set(ar.msg_ids)
    # a resubmission's resubmission (a chain)
    third = rc.resubmit(again.msg_ids[0])
    assert third.get(10) in ([100], 100)
    # (both stores: memory's never said, where the file's did)
    (record,) = rc.db_query({"msg_id": ar.msg_ids[0]}, ["resubmitted"])
    assert record["resubmitted"] == again.msg_ids[0]
    chain = rc.db_query({"resubmitted": {"$in": [again.msg_ids[0], third.msg_ids[0]]}}, [])
    assert [r["msg_id"] for r in chain] == [ar.msg_ids[0], again.msg_ids[0]]
    # in flight, unknown: refused, naming them, and nothing runs
    running = lv.apply_async(time.sleep, 1)
    with pytest.raises(Exception, match="still in flight") as info:
        rc.resubmit([ar.msg_ids[0], running.msg_ids[0]])
    assert running.msg_ids[0] in str(info.value)
    with pytest.raises(Exception, match="no such task"):
        rc.resubmit("no-such-msg-id")
    running.get(10)
    # a task named twice runs once (its second pair was dropped, and its future waited
    # for a record nobody made)
    twice = rc.resubmit([ar.msg_ids[1], ar.msg_ids[2], ar.msg_ids[1]])
    assert len(twice.msg_ids) == 2
    assert twice.get(10) in ([[101], [102]], [101, 102])


def test_resubmit_runs_an_aborted_task(db_rc):
    rc = db_rc
    lv = rc.load_balanced_view()
    busy = [lv.apply_async(time.sleep, 0.8) for _ in rc.ids]
    queued = lv.apply_async(lambda: "ran")
    rc.queue_status()  # (the controller has them all)
    rc.abort(queued.msg_ids)
    with pytest.raises(jx.TaskAborted):
        queued.get(10)
    again = rc.resubmit(queued.msg_ids)
    assert again.get(10) == "ran"
    for ar in busy:
        ar.get(10)


def test_purges(db_rc):
    rc = db_rc
    ar = rc.load_balanced_view().map(abs, [-1, -2], chunksize=1)
    ar.get(10)
    assert rc.purge_hub_results(ar.msg_ids) >= 2
    assert rc.db_query({"msg_id": {"$in": ar.msg_ids}}, ["msg_id"]) == []
    assert rc.get_result(ar.msg_ids[0]).get(10) == [1]  # (a chunk) still here, locally
    rc.purge_results(ar.msg_ids)
    with pytest.raises((KeyError, jx.RemoteError), match="no record"):
        rc.get_result(ar.msg_ids[0]).get(10)
    running = rc.load_balanced_view().apply_async(time.sleep, 0.5)
    rc.purge_hub_results("all")  # running tasks keep their records
    assert [r["msg_id"] for r in rc.db_query({"status": "pending"}, ["msg_id"])] == running.msg_ids
    running.get(10)
    pending = rc.load_balanced_view().apply_async(time.sleep, 0.5)
    with pytest.raises(RuntimeError, match="outstanding"):
        rc.purge_everything()
    assert pending.msg_ids[0] in rc.history  # (nothing forgotten)
    pending.get(10)
    rc.purge_everything()
    assert rc.db_query({}, ["msg_id"]) == []
    assert list(rc.history) == [] and rc.results == {} and rc.metadata == {}


def test_big_requests_and_replies_from_another_client_and_again(db_rc):
    from kernel_engine import clusters

    rc = db_rc
    data = os.urandom(300_000)  # (over the store's 64 KiB: files of their own)
    ar = rc.load_balanced_view().apply_async(lambda b: b[::-1], data)
    assert ar.get(10) == data[::-1]
    other = jx.Client(rc.connection_file)
    try:
        assert other.get_result(ar.msg_ids[0]).get(10) == data[::-1]
        again = other.resubmit(ar.msg_ids)  # (its request read back from the store)
        assert again.get(10) == data[::-1]
    finally:
        other.close()
    (record,) = rc.db_query({"msg_id": ar.msg_ids[0]}, ["buffers", "result_buffers"])
    assert data in record["buffers"] and data[::-1] in b"".join(record["result_buffers"])
    if rc.db_kind == "sqlite":
        blobs = clusters.cluster_folder(rc.cluster_id) / "tasks.db-blobs"
        files = [p for p in blobs.iterdir() if not p.name.startswith(".")]  # (the marker)
        assert len(files) >= 4  # two tasks, each a request and a reply
        rc.purge_hub_results([ar.msg_ids[0], *again.msg_ids])
        assert [p for p in blobs.iterdir() if not p.name.startswith(".")] == []


def test_a_maps_function_is_stored_once_and_resubmitted_whole(db_rc):
    import sqlite3

    from kernel_engine import clusters

    rc = db_rc
    offset = int.from_bytes(os.urandom(4), "little")  # (a function no other test sent)
    ar = rc.load_balanced_view().map(lambda x: x + offset, range(20), chunksize=1)
    assert ar.get(30) == [x + offset for x in range(20)]
    records = rc.db_query({"msg_id": {"$in": ar.msg_ids}}, ["buffers"])
    functions = {r["buffers"][-1] for r in records}  # (a frame of its own, after the chunk)
    assert len(records) == 20 and len(functions) == 1
    (function,) = functions
    assert len(function) > 64 and b"offset" in function
    again = rc.resubmit(ar.msg_ids[:3])  # (their requests read back from the store)
    assert again.get(10) == [[x + offset] for x in range(3)]  # (a chunk each)
    assert len(rc.db_query({"msg_id": {"$in": again.msg_ids}}, ["status"])) == 3  # (written)
    if rc.db_kind == "sqlite":
        path = clusters.cluster_folder(rc.cluster_id) / "tasks.db"
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as con:
            sql = "SELECT request_shared, count(*) FROM tasks WHERE msg_id IN (%s) GROUP BY 1"
            counts = dict(con.execute(sql % ",".join("?" * 20), ar.msg_ids))
            (shared,) = set(counts) - {0}
            assert counts == {0: 1, shared: 19}  # (the first task's has it inline)
            row = con.execute("SELECT refs, data FROM shared WHERE id = ?", (shared,)).fetchone()
        assert row == (22, function)  # (and the 3 resubmitted tasks)


def test_an_unreadable_database_is_moved_aside_not_lost(cluster_factory):
    from kernel_engine import clusters

    cluster = cluster_factory(1)
    folder = clusters.cluster_folder(cluster.cluster_id)
    folder.mkdir(parents=True, mode=0o700)
    (folder / "tasks.db").write_bytes(b"not a database, but somebody's data" * 100)
    (folder / "tasks.db-blobs").mkdir(mode=0o700)
    (folder / "tasks.db-blobs" / "1.1").write_bytes(b"a big result")
    rc = cluster.start_and_connect_sync()
    cluster_factory.record(cluster, rc)
    assert rc[0].apply_sync(lambda: "works") == "works"
    aside = sorted(p.name for p in folder.glob("tasks.db.corrupt-*") if p.is_file())
    assert len(aside) == 1, sorted(p.name for p in folder.iterdir())
    assert (folder / aside[0]).read_bytes().startswith(b"not a database")
    # its blob files go with it (a new database would remove them: no record names them)
    assert (folder / f"{aside[0]}-blobs" / "1.1").read_bytes() == b"a big result"
    assert "unreadable" in (folder / "controller.log").read_text()


@pytest.mark.parametrize("kind", ["text", "sqlite"])
def test_a_file_of_the_users_named_as_db_is_refused_and_left_alone(cluster_factory, tmp_path, kind):
    """``Cluster(db=path)`` naming a file that is not a task database (the user's data,
    or another application's SQLite file) renamed it ``.corrupt-<time>`` and started a
    database in its place: the start now fails, naming the file, and nothing is moved."""
    path = tmp_path / ("results.csv" if kind == "text" else "app.sqlite")
    if kind == "text":
        path.write_bytes(b"a,b\n1,2\n" * 1000)
    else:
        with sqlite3.connect(path) as con:
            con.execute("CREATE TABLE mine (x)")
            con.execute("INSERT INTO mine VALUES (42)")
        con.close()
    before = path.read_bytes()
    cluster = cluster_factory(1, db=str(path))
    with pytest.raises(Exception, match=f"{path.name}.*left as it is"):
        cluster.start_and_connect_sync()
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]


def test_a_blob_folder_in_the_way_stops_the_start_and_moves_nothing(cluster_factory):
    from kernel_engine import clusters

    cluster = cluster_factory(1)
    folder = clusters.cluster_folder(cluster.cluster_id)
    (folder / "tasks.db-blobs").mkdir(parents=True, mode=0o700)
    (folder / "tasks.db-blobs" / "1.0").write_bytes(b"somebody's file")
    with pytest.raises(Exception, match="not this database's blob folder"):
        cluster.start_and_connect_sync()
    assert (folder / "tasks.db-blobs" / "1.0").read_bytes() == b"somebody's file"
    assert not list(folder.glob("tasks.db.corrupt-*"))


def test_result_requests_of_many_records_at_once_are_all_answered(db_rc):
    """Replies of more frames than a batch may hold (here 250 records, about 6 frames
    each), several for one client in one turn of the controller's loop: each is answered
    (in one batch, the client refused them all; found by review)."""
    view = db_rc.load_balanced_view()
    ars = [view.apply_async(abs, -i) for i in range(250)]
    ids = [m for ar in ars for m in ar.msg_ids]
    for ar in ars:
        ar.get(60)
    other = jx.Client(db_rc.connection_file)
    try:
        request = protocol.ResultRequest(tuple(ids))
        futures = [other.transport.tell(protocol.RESULT_REQUEST, request) for _ in range(4)]
        for future in futures:
            assert future.result(15)["status"] == "ok"
    finally:
        other.close()


def test_keys_may_be_one_name_or_a_generator(db_rc):
    """IPython Parallel's db_query takes one key's name as ``keys`` (its documentation's
    example: ``keys='result_header'``): it raised TypeError here; a generator of keys
    was read by the check and none were sent (only msg_id came back)."""
    rc = db_rc
    ar = rc.load_balanced_view().apply_async(abs, -3)
    assert ar.get(10) == 3
    (record,) = rc.db_query({"msg_id": ar.msg_ids[0]}, keys="status")
    assert record == {"msg_id": ar.msg_ids[0], "status": "ok"}
    (record,) = rc.db_query({"msg_id": ar.msg_ids[0]}, (k for k in ["status", "engine_id"]))
    assert set(record) == {"msg_id", "status", "engine_id"}
    with pytest.raises(TypeError, match="keys"):
        rc.db_query({}, keys=5)


def test_query_values_from_history_ranges_and_numpy(db_rc):
    """Values a user has at hand: ``rc.history`` itself, a range, numpy's integers (as
    engine ids are elsewhere): each failed with 'is not JSON serializable'."""
    np = pytest.importorskip("numpy")
    rc = db_rc
    ar = rc[:].apply_async(abs, -4)
    assert ar.get(10) == [4, 4]
    keys = ["engine_id"]
    mine = {r["msg_id"] for r in rc.db_query({"msg_id": {"$in": rc.history}}, keys)}
    assert set(ar.msg_ids) <= mine
    on_one = rc.db_query({"msg_id": {"$in": ar.msg_ids}, "engine_id": np.int64(1)}, keys)
    assert [r["engine_id"] for r in on_one] == [1]
    both = rc.db_query({"msg_id": {"$in": ar.msg_ids}, "engine_id": {"$in": np.arange(2)}}, keys)
    assert sorted(r["engine_id"] for r in both) == [0, 1]
    below = rc.db_query({"msg_id": {"$in": ar.msg_ids}, "engine_id": {"$nin": range(1, 9)}}, keys)
    assert [r["engine_id"] for r in below] == [0]


def test_a_running_load_balanced_tasks_record_names_its_engine(db_rc):
    """While it runs, a load-balanced task's record names the engine running it in both
    stores (with SQLite, the file had it only with the outcome: ``engine_id`` None,
    where memory said which; IPython Parallel's records name it once it is assigned)."""
    rc = db_rc
    running = rc.load_balanced_view().apply_async(time.sleep, 1.5)
    eid = None
    deadline = time.monotonic() + 10
    while eid is None and time.monotonic() < deadline:
        rc.queue_status()
        eid = running.metadata.get("engine_id")
        (record,) = rc.db_query({"msg_id": running.msg_ids[0]}, ["engine_id", "engine_uuid"])
        if record["engine_id"] is not None:
            break
        time.sleep(0.05)
    assert not running.done(), "the task ended before its record was seen"
    assert record["engine_id"] in rc.ids and record["engine_uuid"]
    busy = rc.db_query({"engine_id": record["engine_id"], "completed": None}, ["msg_id"])
    assert running.msg_ids[0] in {r["msg_id"] for r in busy}
    running.get(10)
    (done,) = rc.db_query({"msg_id": running.msg_ids[0]}, ["engine_id", "engine_uuid"])
    assert done == record


def test_what_an_execute_printed_is_in_the_record_in_both_stores(db_rc):
    """``%px``'s execute_request prints on iopub only (its reply carries no copy, as a
    function call's does): the in-memory store kept none of it, nor the engine's uuid,
    where the file had both."""
    rc = db_rc
    ar = rc[1].execute("print('from an execute')")
    ar.get(10)
    ar.wait_for_output(5)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        (record,) = rc.db_query({"msg_id": ar.msg_ids[0]}, ["stdout", "engine_uuid"])
        if record["stdout"]:
            break
        time.sleep(0.1)
    assert record["stdout"] == "from an execute\n"
    assert record["engine_uuid"] == rc.db_query({"engine_id": 1}, ["engine_uuid"])[0]["engine_uuid"]
