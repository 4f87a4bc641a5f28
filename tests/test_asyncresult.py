"""AsyncResult: the Future API, metadata and timing, as seeds 000, 001, 003 and 004 describe."""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import sys
import time
from datetime import datetime

import cloudpickle
import pytest

import jupyter_ext as jx
from jupyter_ext._metadata import METADATA_KEYS

cloudpickle.register_pickle_by_value(sys.modules[__name__])


def test_is_a_future_with_the_multiprocessing_interface(rc):
    ar = rc[0].apply_async(lambda: (time.sleep(0.3), 5)[1])
    assert isinstance(ar, concurrent.futures.Future)
    assert not ar.ready()
    with pytest.raises(AssertionError):
        ar.successful()
    assert ar.wait(0.01) is False
    with pytest.raises(TimeoutError):
        ar.get(0.01)
    assert ar.wait(5) is True
    assert ar.ready() and ar.successful()
    assert ar.get() == 5 and ar.r == 5 and ar.result() == 5 and ar.done()


def test_failed_result(rc):
    ar = rc[0].apply_async(lambda: 1 / 0)
    assert ar.wait(5)
    assert ar.ready() and not ar.successful()
    with pytest.raises(jx.RemoteError, match="ZeroDivisionError"):
        ar.get()
    assert isinstance(ar.exception(), jx.RemoteError)


def test_metadata_has_every_key(rc):
    ar = rc[:].apply_async(lambda: print("hi") or 1)
    ar.get(5)
    for md in ar.metadata:
        assert set(METADATA_KEYS) <= set(md)
        assert md["status"] == "ok" and md.status == "ok"
        for key in ("submitted", "started", "completed", "received"):
            assert isinstance(md[key], datetime), key
        assert md["submitted"] <= md["received"]
        assert md["started"] <= md["completed"]
        assert md["stdout"] == "hi\n"
        assert md["engine_uuid"]
        assert md["msg_id"] in ar.msg_ids
    assert [md["engine_id"] for md in ar.metadata] == [0, 1]
    assert ar.engine_id == [0, 1]
    assert ar["stdout"] == ["hi\n", "hi\n"]
    assert rc.metadata[ar.msg_ids[0]]["stdout"] == "hi\n"
    assert ar.msg_ids[0] in rc.history and ar.msg_ids[0] in rc.results
    assert rc.results[ar.msg_ids[0]] == 1


def test_timing_properties(rc):
    ar = rc[:].apply_async(time.sleep, 0.2)
    assert ar.elapsed >= 0
    ar.get(5)
    assert 0.35 <= ar.serial_time < 2.0
    assert 0.2 <= ar.wall_time < 2.0
    assert ar.progress == len(ar) == 2
    speedup = ar.serial_time / ar.wall_time
    assert speedup > 1.0


def test_iteration_as_results_arrive_and_indexing(rc):
    ar = rc[:].apply_async(lambda t: (time.sleep(t), t)[1], 0.1)
    assert list(ar) == [0.1, 0.1]
    assert ar[0] == 0.1 and ar[-1] == 0.1 and len(ar) == 2


def test_add_done_callback(rc):
    got = concurrent.futures.Future()
    f = rc[-1].apply(os.getpid)
    f.add_done_callback(lambda fut: got.set_result(fut.result()))
    assert got.result(5) == rc.engine_info(rc.ids[-1])["pid"]


def test_await_and_wrap_future(rc):
    def sleep_task(t):
        time.sleep(t)
        return os.getpid()

    async def work():
        out = []
        for t in [0.01, 0.02]:
            ar = rc[:].apply(sleep_task, t)
            out.append(await asyncio.wrap_future(ar))
            out.append(await rc[:].apply(sleep_task, t))
        return out

    results = asyncio.run(asyncio.wait_for(work(), 20))
    pids = [rc.engine_info(i)["pid"] for i in rc.ids]
    assert results == [pids] * 4


def test_client_wait_outstanding_history(rc):
    ars = [rc[:].apply_async(time.sleep, 0.05) for _ in range(3)]
    assert rc.wait(ars, timeout=10) is True
    assert not any(m in rc.outstanding for ar in ars for m in ar.msg_ids)
    slow = rc[0].apply_async(time.sleep, 1)
    assert rc.wait(slow, timeout=0.01) is False
    assert slow.msg_ids[0] in rc.outstanding
    assert rc.wait(timeout=10) is True
    rc.spin()


def test_abort_queued_work(rc):
    rc[0].apply_async(time.sleep, 0.5)
    queued = rc[0].apply_async(lambda: "ran")
    queued.abort()
    with pytest.raises(jx.TaskAborted):
        queued.get(10)


def test_a_cancelled_result_raises_at_once_even_with_return_exceptions(rc):
    """Cancelling aborts what has not started; a task that runs on has no outcome to wait
    for here: get() raises CancelledError at once, return_exceptions or not (it waited
    for the running task, past any timeout)."""
    ar = rc[0].apply_async(time.sleep, 3)
    assert ar.cancel() and ar.cancelled()
    for kwargs in ({}, {"return_exceptions": True}):
        t0 = time.monotonic()
        with pytest.raises(concurrent.futures.CancelledError):
            ar.get(1, **kwargs)
        assert time.monotonic() - t0 < 0.5, kwargs
    rc[0].apply_sync(time.sleep, 0)  # (the engine is done with the sleep)


def test_wait_interactive_text(rc, capsys):
    ar = rc[:].apply_async(time.sleep, 0.3)
    assert ar.wait_interactive(interval=0.05, widget=False) is None
    assert ar.ready()
    out = capsys.readouterr().out
    assert "2/2 tasks" in out


def test_progress_can_be_switched_off(rc, capsys, monkeypatch):
    rc[:].apply_async(time.sleep, 0.2).wait_interactive(interval=0.05, widget=False, show=False)
    assert capsys.readouterr().out == ""
    monkeypatch.setenv("JUPYTER_PX_PROGRESS", "off")
    ar = rc[:].apply_async(time.sleep, 0.2)
    ar.wait_interactive(interval=0.05, widget=False)
    assert ar.ready() and capsys.readouterr().out == ""


def test_queue_status_and_hub_queries(rc):
    ar = rc[:].apply_async(abs, -1)
    ar.get(5)
    status = rc.queue_status()
    assert set(status) >= {0, 1, "unassigned"}
    assert status[0]["completed"] >= 1
    assert ar.msg_ids[0] in rc.hub_history()
    assert rc.result_status(ar.msg_ids)["completed"] == ar.msg_ids
    records = rc.db_query({"msg_id": ar.msg_ids[0]})
    assert records[0]["status"] == "ok" and records[0]["engine_id"] == 0
    rc.purge_results("all")
    assert ar.msg_ids[0] not in rc.results
    assert ar.get() == [1, 1]  # the AsyncResult keeps its own


def test_rich_and_plain_reprs(rc):
    ar = rc[:].apply_async(abs, -1)
    ar.get(10)
    html = ar._repr_html_()
    assert "AsyncResult" in html and "done" in html and "2/2" in html
    assert repr(ar) == "<AsyncResult(abs): finished>"
    pending = rc[0].apply_async(time.sleep, 0.5)
    assert "pending" in pending._repr_html_()
    pending.get(10)
    failed = rc[0].apply_async(lambda: 1 / 0)
    failed.wait(10)
    assert "ZeroDivisionError" in failed._repr_html_()
    client_html = rc._repr_html_()
    for eid in rc.ids:
        assert str(rc.engine_info(eid)["pid"]) in client_html
    assert "DirectView" in rc[:]._repr_html_() and "block" in rc[:]._repr_html_()
    assert "LoadBalancedView" in rc.load_balanced_view()._repr_html_()
    cluster = jx.Cluster.from_file(rc.connection_file)
    assert "running" in cluster._repr_html_() and cluster.cluster_id in repr(cluster)


def test_results_that_cannot_be_put_together_raise_instead_of_hanging(rc):
    # a map's chunk must be a list; a peer that answers a chunk with anything else must
    # not leave the map waiting for ever
    done = rc[0].apply_async(abs, -1)
    assert done.get(10) == 1
    odd = jx.AsyncMapResult(rc, list(done._children), [1], fname="f")
    with pytest.raises(TypeError) as info:
        odd.get(5)
    assert "while putting the results of f together" in str(info.value.__notes__)


def test_a_result_of_futures_done_already_counts_them_together():
    """Children done before their result exists (most of a long map's) are counted in
    one go; those still pending call back; a failed one still fails the whole, and an
    unordered map's get() keeps the input's order (ordered is iteration's order)."""
    from types import SimpleNamespace

    from jupyter_ext._asyncresult import AsyncMapResult, AsyncResult
    from jupyter_ext._metadata import Metadata
    from jupyter_ext._request import Request

    client = SimpleNamespace(transport=None)
    made = iter(range(1000))

    def pending() -> Request:
        msg_id = f"task-{next(made)}"
        return Request(msg_id, Metadata(msg_id=msg_id))

    def end(req: Request, value: object, ok: bool = True) -> Request:
        req.outcome = (ok, value)
        req.settle()
        return req

    def finished(value: object) -> Request:
        return end(pending(), value)

    assert AsyncResult(client, [finished(1), finished(2)]).get(0) == [1, 2]
    late, twice = pending(), finished(3)
    ar = AsyncResult(client, [late, twice, twice])  # (one given twice counts twice)
    assert not ar.done()
    end(late, 0)
    assert ar.get(1) == [0, 3, 3]
    failed = end(pending(), jx.RemoteError("ValueError", "no"), ok=False)
    with pytest.raises(jx.RemoteError, match="no"):
        AsyncResult(client, [finished(1), failed]).get(0)
    first = pending()
    amr = AsyncMapResult(client, [first, finished([1]), finished([2])], [1, 1, 1], ordered=False)
    assert not amr.done()
    end(first, [0])
    assert amr.get(1) == [0, 1, 2]  # (the input's order: ordered is iteration's order)
    assert AsyncMapResult(client, [finished([5]), finished([6])], [1, 1]).get(0) == [5, 6]


def test_get_with_first_exception_waits_its_timeout_once(rc):
    """``get(T, return_when=FIRST_EXCEPTION)`` waited T for a failure, then T again for
    the whole: about 2T before its TimeoutError."""
    ar = rc[:].apply_async(time.sleep, 3)
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        ar.get(1, return_when=jx.FIRST_EXCEPTION)
    assert time.monotonic() - started < 1.6
    assert ar.get(10) == [None, None]


@pytest.mark.parametrize("kind", ["apply", "map"])
def test_iterating_a_failed_result_raises_a_fresh_error_as_get_does(rc, kind):
    """Iteration raised the error the result keeps: each raise grew its traceback and
    kept the iterating frames (and their locals) alive with it."""
    if kind == "apply":
        ar = rc[:].apply_async(lambda: 1 / 0)
    else:
        ar = rc.load_balanced_view().map(lambda x: 1 / x, [0, 0])
    assert ar.wait(10)
    kept = ar._children[0].exception()
    raised = []
    for _ in range(3):
        with pytest.raises(jx.RemoteError, match="ZeroDivisionError") as info:
            list(ar)
        raised.append(info.value)
    assert all(exc is not kept for exc in raised)
    assert kept.__traceback__ is None
    assert len({id(exc) for exc in raised}) == 3


def test_wait_interactive_text_ends_on_its_outcome(rc, capsys):
    """The text bar ends on what happened, as the widget does: tasks that failed read
    "(failed)", a wait that timed out "(not finished)" (both ended on "2/2 tasks" or
    "0/2 tasks" alone, the look of a success)."""
    ar = rc[:].apply_async(lambda: 1 / 0)
    ar.wait_interactive(interval=0.05, widget=False)
    out = capsys.readouterr().out.rstrip()
    assert "2/2 tasks" in out and out.endswith(" s (failed)")
    slow = rc[:].apply_async(time.sleep, 2)
    slow.wait_interactive(interval=0.05, widget=False, timeout=0.2)
    assert capsys.readouterr().out.rstrip().endswith("(not finished)")
    ok = rc[:].apply_async(abs, -1)
    ok.wait_interactive(interval=0.05, widget=False)
    assert capsys.readouterr().out.rstrip().endswith("(done)")
    slow.get(10)
