"""IPython Parallel's public behaviour (``../shared/IPP_API.md``), with only the import
changed: each test is written from the predecessor's documentation, against a real
cluster."""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import os
import signal
import subprocess
import sys
import time

import cloudpickle
import pytest
from conftest import wait_gone

import jupyter_ext as jx

cloudpickle.register_pickle_by_value(sys.modules[__name__])


def _fail_if(x):
    if x == 3:
        raise ValueError(f"bad {x}")
    return x


def _publish(n):
    from jupyter_ext.datapub import publish_data

    for i in range(n):
        publish_data({"step": i})
    return n


# ----- Client


def test_client_iterates_views_and_activates_magics(rc):
    views = list(rc)
    assert [v.targets for v in views] == rc.ids and len(rc) == 2
    assert rc[-1].targets == rc.ids[-1] and rc[::2].targets == rc.ids[::2]
    with pytest.raises(RuntimeError, match="IPython"):  # (magics need IPython: test_magics)
        rc.activate(targets=[0], suffix="_compat")


def test_wait_for_engines_blocks_or_returns_a_future(rc):
    assert rc.wait_for_engines(2, timeout=5) is None
    future = rc.wait_for_engines(2, block=False)
    assert isinstance(future, concurrent.futures.Future) and future.result(5) is None
    with pytest.raises(TimeoutError):
        rc.wait_for_engines(3, timeout=0.2)


def test_wait_takes_history_indices_and_negative_timeouts(rc):
    rc[0].apply_async(abs, -1)
    assert rc.wait(-1, timeout=-1) is True  # IPython Parallel's "forever"


def test_purge_local_results_refuses_outstanding_work(rc):
    ar = rc[0].apply_async(time.sleep, 0.5)
    with pytest.raises(RuntimeError, match="outstanding"):
        rc.purge_local_results(ar)
    ar.get(5)
    rc.purge_local_results(ar)
    assert ar.msg_ids[0] not in rc.results


def test_purging_an_engines_results_keeps_the_other_engines(rc):
    """``purge_results(targets=...)`` forgets those engines' results, here and on the
    controller, as IPython Parallel's does; it used to forget every result here."""
    on0, on1 = rc[0].apply_async(abs, -1), rc[1].apply_async(abs, -2)
    assert rc.wait([on0, on1], timeout=5)
    records = lambda: {  # noqa: E731
        r["msg_id"] for r in rc.db_query({"msg_id": {"$in": on0.msg_ids + on1.msg_ids}})
    }
    rc.purge_results(targets=0)
    assert on0.msg_ids[0] not in rc.results and on1.msg_ids[0] in rc.results
    assert records() == set(on1.msg_ids)
    rc.purge_local_results(targets=[1])
    assert on1.msg_ids[0] not in rc.results


def test_a_bare_purge_is_refused_and_forgets_nothing(rc):
    """``rc.purge_results()`` with no argument forgot every result, here and on the
    controller; IPython Parallel refuses it (ValueError). An empty list names nothing."""
    ar = rc[0].apply_async(abs, -5)
    assert ar.get(timeout=10) == 5
    msg_id = ar.msg_ids[0]
    for purge in (rc.purge_results, rc.purge_local_results, rc.purge_hub_results):
        with pytest.raises(ValueError, match="jobs or targets"):
            purge()
    assert msg_id in rc.results and msg_id in rc.metadata
    assert rc.result_status(ar)["completed"] == [msg_id]
    rc.purge_results([])
    assert rc.purge_hub_results(jobs=[]) == 0
    assert msg_id in rc.results and rc.result_status(ar)["completed"] == [msg_id]
    rc[1].purge_results()  # (a view's bare purge: its own results; engine 1 made none)
    assert msg_id in rc.results and rc.result_status(ar)["completed"] == [msg_id]


def test_a_views_purge_results_forgets_only_its_own(rc):
    """``view.purge_results()`` used to forget every result of every client, on the
    controller too."""
    view = rc[0]
    other = rc.load_balanced_view().apply_async(abs, -3)
    mine = view.apply_async(abs, -4)
    assert rc.wait([other, mine], timeout=5)
    view.purge_results()
    assert mine.msg_ids[0] not in rc.results and other.msg_ids[0] in rc.results
    assert rc.result_status(other)["completed"] == other.msg_ids
    with pytest.raises(KeyError, match=mine.msg_ids[0]):
        rc.result_status(mine)


def test_a_views_purge_of_all_targets_means_its_own_engines(rc):
    """IPython Parallel's ``view.purge_results(targets="all")`` purges the view's engines'
    results; ``rc[0]``'s forgot engine 1's too, here and on the controller."""
    on0, on1 = rc[0].apply_async(abs, -1), rc[1].apply_async(abs, -2)
    assert rc.wait([on0, on1], timeout=5)
    rc[0].purge_results(targets="all")
    assert on0.msg_ids[0] not in rc.results and on1.msg_ids[0] in rc.results
    assert rc.result_status(on1)["completed"] == on1.msg_ids
    with pytest.raises(KeyError, match=on0.msg_ids[0]):
        rc.result_status(on0)


def test_a_load_balanced_view_of_all_engines_can_be_made_before_they_register(
    cluster_factory,
):
    """As IPython Parallel's: ``targets="all"`` names whichever engines there are when
    the view is used (it raised NoEnginesRegistered when made before engines came)."""
    cluster, rc = cluster_factory.start(0)
    view = rc.load_balanced_view(targets="all")
    executor = rc.executor("all")
    rc.load_balanced_view().set_flags(targets="all")
    cluster.start_engines_sync(1)
    rc.wait_for_engines(1, timeout=30)
    cluster_factory.record(cluster, rc)
    assert view.apply_sync(abs, -3) == 3
    assert executor.submit(abs, -4).result(10) == 4


def test_abort_takes_block_none_as_ipython_parallels(rc):
    """``abort(block=None)``: the client's ``block`` (it raised TypeError)."""
    ar = rc[0].apply_async(time.sleep, 2)
    queued = rc[0].apply_async(abs, -1)
    rc.abort(queued, block=None)
    with pytest.raises(jx.TaskAborted):
        queued.get(10)
    ar.get(10)
    with pytest.raises(TypeError, match="block must be True or False"):
        rc.abort(queued, block=1)


def test_calls_on_jobs_take_history_indices(rc):
    """As IPython Parallel's ``_msg_ids_from_jobs``: result_status, purge_* and
    wait_interactive take indices into ``rc.history`` as wait and get_result do."""
    ar = rc[0].apply_async(abs, -1)
    ar.get(5)
    rc.wait_interactive(-1)
    rc.wait_interactive([-1])
    assert rc.result_status(-1)["completed"] == ar.msg_ids
    assert rc.result_status([-1])["completed"] == ar.msg_ids
    rc.purge_results(-1)
    assert ar.msg_ids[0] not in rc.results
    with pytest.raises(IndexError, match="history index -100000"):
        rc.result_status(-100000)


def test_send_signal_takes_names_and_says_who(rc):
    ar = rc[1].apply_async(time.sleep, 30)
    time.sleep(0.3)
    assert rc.send_signal("SIGINT", targets=[1]) == [1]
    with pytest.raises(jx.RemoteError, match="KeyboardInterrupt"):
        ar.get(5)
    with pytest.raises(ValueError, match="NOPE"):
        rc.send_signal("NOPE")
    with pytest.raises(NotImplementedError):
        rc.shutdown(restart=True)


# ----- AsyncResult


def test_get_with_return_exceptions_and_first_exception(rc):
    view = rc.load_balanced_view()
    ar = view.map_async(_fail_if, range(6))
    results = ar.get(10, return_exceptions=True)
    assert results[:3] == [0, 1, 2] and isinstance(results[3], jx.RemoteError)
    slow = rc[:].apply_async(lambda x: (__import__("time").sleep(x), 1 / x), 0)
    with pytest.raises(jx.RemoteError, match="ZeroDivisionError"):
        slow.get(5, return_when=jx.FIRST_EXCEPTION)


def test_wait_with_return_when_gives_done_and_pending_parts(rc):
    ar = rc[:].apply_async(lambda t: __import__("time").sleep(t) or t, 0)
    ar.get(5)
    lb = rc.load_balanced_view()
    quick_and_slow = jx.AsyncResult.join(lb.apply_async(abs, -1), lb.apply_async(time.sleep, 2))
    done, pending = quick_and_slow.wait(5, return_when=jx.FIRST_COMPLETED)
    assert len(done) == 1 and len(pending) == 1
    assert next(iter(done)).get() == 1
    assert quick_and_slow.wait_for_output(5)
    parts = ar.split()
    assert len(parts) == 2 and [p.get() for p in parts] == [0, 0]
    joined = jx.AsyncResult.join(*parts)
    assert joined.get() == [0, 0]
    amr = lb.map_async(abs, range(-4, 0), chunksize=2)
    assert [p.get() for p in amr.split()] == [[4, 3], [2, 1]]
    assert jx.AsyncResult.join(*amr.split()).get() == [4, 3, 2, 1]


def test_metadata_as_attributes_items_and_in_dir(rc):
    ar = rc[0].apply_async(print, "hello")
    ar.get(5)
    assert ar.stdout == "hello\n" and ar["stdout"] == "hello\n" and ar["engine_id"] == 0
    assert {"stdout", "engine_id", "data", "started"} <= set(dir(ar))


def test_timing_is_only_known_when_done(rc):
    ar = rc[0].apply_async(time.sleep, 0.5)
    for name in ("wall_time", "serial_time"):
        with pytest.raises(TimeoutError):
            getattr(ar, name)
    ar.get(5)
    assert ar.wall_time >= ar.serial_time >= 0.4
    assert ar.timedelta("submitted", "received") == pytest.approx(ar.wall_time)


def test_published_data_reaches_ar_data(rc):
    ar = rc[0].apply_async(_publish, 3)
    assert ar.get(5) == 3
    deadline = time.monotonic() + 5
    while ar.data.get("step") != 2:
        assert time.monotonic() < deadline, ar.data
        time.sleep(0.02)


def test_display_outputs_labels_one_engine_too_and_failed_tasks(rc, capsys):
    ar = rc[0].execute("print('out'); import sys; print('err', file=sys.stderr); 1/0")
    with pytest.raises(jx.RemoteError):
        ar.get(5)
    ar.display_outputs()
    captured = capsys.readouterr()
    assert "[stdout:0] out" in captured.out and "[stderr:0] err" in captured.err


# ----- views


def test_references_anywhere_in_arguments_with_expressions(dv):
    dv.push({"g": [3, 4], "h": 5})
    out = dv.apply_sync(lambda a, b: (a, b), [jx.Reference("g[0]")], b={"k": jx.Reference("h")})
    assert out == [([3], {"k": 5})] * 2


def test_functions_sent_by_value_see_the_engine_namespace(dv):
    dv["secret"] = 42

    def reveal():
        return secret  # noqa: F821 (the engine's)

    reveal.__module__ = "__main__"
    dv.push({"reveal": reveal})
    assert dv.execute("found = reveal()", block=True)
    assert dv["found"] == [42, 42]


def test_execute_is_silent_by_default_and_takes_a_label(dv):
    ar = dv.execute("x_silent = 1\nx_silent + 1", label="quiet")
    ar.get(5)
    assert ar.execute_result == [None, None] and ar.label == ["quiet", "quiet"]


def test_importer_imports_on_the_engines(dv):
    with dv.importer:
        import math

    assert dv.apply_sync(jx.interactive(lambda: math.floor(2.5))) == [2, 2]


def test_broadcast_view_runs_on_every_target(rc):
    view = rc.broadcast_view(is_coalescing=True)
    assert view.apply_sync(lambda: 7) == [7] * len(rc)
    assert isinstance(view, jx.DirectView) and view.is_coalescing


def test_views_take_flags_at_creation(rc):
    assert rc.direct_view(0, block=True).apply(abs, -2) == 2
    assert rc.direct_view([0], block=True).apply(abs, -2) == [2]
    assert rc.load_balanced_view(retries=2).retries == 2
    with pytest.raises(TypeError, match="retries"):
        rc.load_balanced_view(retries="two")


def test_pickler_switch_here_and_on_engines(dv):
    try:
        dv.use_pickle()
        assert jx.use_pickle() is None
        with pytest.raises(jx.SerializationError):
            dv.apply_sync(lambda: 1)  # lambdas need cloudpickle
        assert dv.apply_sync(abs, -3) == [3, 3]
    finally:
        dv.use_cloudpickle()
    assert dv.apply_sync(lambda: 1) == [1, 1]


# ----- load balancing


def test_imap_is_a_lazy_iterator_with_cancel_and_return_exceptions(rc):
    view = rc.load_balanced_view()
    it = view.imap(_fail_if, range(6), return_exceptions=True, max_outstanding=2)
    results = list(it)
    assert results[:3] == [0, 1, 2] and isinstance(results[3], jx.RemoteError)

    def endless():
        i = 0
        while True:
            yield i
            i += 1

    lazy = view.imap(abs, endless(), max_outstanding=3)
    first = [next(lazy) for _ in range(5)]
    lazy.cancel()
    rest = list(lazy)  # what was submitted still comes
    assert first == [0, 1, 2, 3, 4] and len(rest) <= 3


def test_retries_end_with_the_error(rc):
    view = rc.load_balanced_view(retries=2)
    with pytest.raises(jx.RemoteError, match="ValueError"):
        view.apply_sync(_fail_if, 3)


# ----- dependencies


def test_dependency_check_and_unreachable():
    dep = jx.Dependency(["a", "b"], all=True, success=True, failure=False)
    assert not dep.check({"a"}) and dep.check({"a", "b"})
    assert dep.unreachable(set(), {"a"}) and not dep.unreachable({"a"}, set())
    anyof = jx.Dependency(["a", "b"], all=False, success=False, failure=True)
    assert anyof.check(set(), {"b"}) and anyof.unreachable({"a", "b"}, set())
    assert jx.Dependency([]).check(set()) and not jx.Dependency([]).unreachable(set())


def test_dependency_flags_must_be_bools():
    """Dependency(ids, success="no") counted successes as met (its flags were taken by
    their truthiness), and so did the dict form's."""
    for flag in ("all", "success", "failure"):
        with pytest.raises(TypeError, match=f"Dependency's {flag} must be True or False"):
            jx.Dependency(["a"], **{flag: "no"})
        with pytest.raises(TypeError, match=f"Dependency's {flag} must be True or False"):
            jx.Dependency({"dependencies": ["a"], flag: "no"})
    assert jx.Dependency(["a"], success=False, failure=True).success is False


def test_require_imports_and_pushes_objects_and_functions(rc):
    def helper():
        return "helped"

    helper.__module__ = "__main__"

    def task():
        return json.dumps([helper(), answer])  # noqa: F821 (pushed by require)

    task.__module__ = "__main__"  # (as if defined in a notebook)
    task = jx.require("json", helper, answer=42)(task)
    view = rc.load_balanced_view()
    assert view.apply_sync(task) == '["helped", 42]'
    checked = jx.dependent(lambda: 1, lambda: True)
    assert view.apply_sync(checked) == 1


def test_require_refuses_a_callable_without_a_name_when_decorating():
    """@require(functools.partial(f, 1)) was accepted, and every task of the function
    then failed on its engine with AttributeError: 'functools.partial' object has no
    attribute '__name__' (IPython Parallel refuses it when decorating)."""
    import functools

    with pytest.raises(TypeError, match="pass other objects by keyword"):
        jx.require(functools.partial(max, 1))
    assert jx.require("json", max, part=functools.partial(max, 1))(abs)(-1) == 1


def test_deserialize_object_returns_the_frames_it_did_not_use():
    """Objects serialized one after the other into one list (as IPython Parallel's code
    does) came back as the first alone: deserialize_object returned no remaining frames,
    and the next call raised IndexError."""
    import numpy as np

    frames = (
        jx.serialize_object(np.arange(300_000))
        + jx.serialize_object({"x": np.ones(5000)})
        + jx.serialize_object("last")
    )
    first, rest = jx.deserialize_object(frames)
    second, rest = jx.deserialize_object(rest)
    third, rest = jx.deserialize_object(rest)
    assert first.tolist() == list(range(300_000)) and second["x"].sum() == 5000
    assert third == "last" and rest == []


def test_canning_helpers_round_trip():
    obj = {"a": [1, 2]}
    assert jx.can(obj) is obj and jx.uncan(obj) is obj
    assert jx.deserialize_object(jx.serialize_object(obj))[0] == obj
    f, args, kwargs = jx.unpack_apply_message(jx.pack_apply_message(abs, (-1,), {}))
    assert f(*args, **kwargs) == 1
    assert jx.uncan([jx.Reference("z")], {"z": 9}) == [9]


# ----- errors, joblib, the manager


def test_error_helpers():
    err = jx.RemoteError("ValueError", "bad", ["line"], {"engine_id": 1})
    with pytest.raises(jx.CompositeError):
        jx.collect_exceptions([1, err], "map")
    assert jx.collect_exceptions([1, 2], "map") == [1, 2]
    try:
        raise KeyError("k")
    except KeyError:
        content = jx.wrap_exception({"engine_id": 3})
    assert jx.unwrap_exception(content).ename == "KeyError"
    shown = jx.AlreadyDisplayedError(jx.CompositeError("two", [err, err]))
    assert shown.original_error.elist == [err, err]
    assert issubclass(jx.RemoteError, jx.KernelError) and jx.TimeoutError is TimeoutError


def test_joblib_runs_on_the_cluster(rc):
    import joblib

    rc.load_balanced_view().register_joblib_backend()
    with joblib.parallel_backend("ipyparallel"):
        out = joblib.Parallel(n_jobs=-1)(joblib.delayed(abs)(-i) for i in range(10))
    assert out == list(range(10))


def test_cluster_manager_knows_running_clusters(rc):
    manager = jx.ClusterManager()
    known = manager.load_clusters()
    assert rc.cluster_id in known
    # IPython Parallel's keywords (a TypeError before)
    again = manager.load_clusters(profile="default", init_default_clusters=True)
    assert rc.cluster_id in again
    assert rc.cluster_id in jx.ClusterManager().load_clusters(profile_dirs=[], profiles=None)
    with pytest.raises(KeyError, match="no-such"):
        manager.get_cluster("no-such")
    # new_cluster gives the key and the cluster, as IPython Parallel's (it gave the cluster)
    key, cluster = manager.new_cluster(n=1)
    assert key == cluster.cluster_id and manager.get_cluster(key) is cluster
    assert not cluster.running
    manager.remove_cluster(key)


def test_cluster_manager_finds_a_cluster_named_like_a_file_here(rc, tmp_path, monkeypatch):
    """A file in the working folder with the cluster's id for a name (a script, a data
    file: ids may have dots) is not taken for the cluster's connection file."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / rc.cluster_id).write_text("print('not a connection file')\n")
    known = jx.ClusterManager().load_clusters()
    found = known[rc.cluster_id]
    assert found.folder.name == rc.cluster_id and found.folder.parent != tmp_path
    assert found.running


def test_a_cluster_id_names_the_cluster_even_beside_a_file_of_that_name(rc, tmp_path, monkeypatch):
    """``Cluster.from_file("<id>")`` (the code JupyterLab's "insert client code" writes)
    and ``Client("<id>")`` read a file of that name in the working folder as the
    connection file (JSONDecodeError); a bare id now means the cluster, ``./<id>`` the
    file."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / rc.cluster_id).write_text("print('not a connection file')\n")
    cluster = jx.Cluster.from_file(rc.cluster_id)
    assert cluster.cluster_id == rc.cluster_id
    other = jx.Client(rc.cluster_id)
    try:
        assert other.ids == rc.ids
    finally:
        other.close()
    with pytest.raises(ValueError, match=f"{rc.cluster_id}.* is not a cluster connection file"):
        jx.Client(f"./{rc.cluster_id}")
    (tmp_path / "other.json").write_text('{"ip": "127.0.0.1"}')
    with pytest.raises(ValueError, match=r"other\.json' is not a cluster connection file: no key"):
        jx.Client("other.json")


def test_px_flags_of_ipython_parallel():
    from jupyter_ext._magics import _parser, _signum

    args = _parser("px").parse_args(
        ["-t", "::2", "-a", "-r", "-o", "res", "--signal-on-interrupt", "SIGTERM"]
    )
    assert (args.targets, args.block, args.group_outputs, args.save_name) == (
        "::2",
        False,
        "order",
        "res",
    )
    assert _signum(args.signal_on_interrupt) == int(signal.SIGTERM)
    assert _parser("px").parse_args(["-e", "-b"]).group_outputs == "engine"
    assert _signum("INT") == _signum("2") == int(signal.SIGINT) and _signum("0") == 0
    with pytest.raises(ValueError):
        _signum("NOPE")


def test_stream_output_prints_as_it_comes(rc, capsys):
    ar = rc[0].apply_async(print, "streamed")
    with ar.stream_output():
        ar.get(5)
        time.sleep(0.3)  # (iopub may trail the reply)
    assert "[stdout:0] streamed" in capsys.readouterr().out


def test_engines_load_the_users_ipython_profile(cluster_factory, tmp_path, monkeypatch):
    """As any IPython kernel: the default profile's config, or the one the cluster names."""
    monkeypatch.setenv("IPYTHONDIR", str(tmp_path))
    for name, value in (("default", "from default"), ("lab", "from lab")):
        folder = tmp_path / f"profile_{name}"
        folder.mkdir()
        (folder / "ipython_config.py").write_text(
            f'c.InteractiveShellApp.exec_lines = ["configured = {value!r}"]\n'
        )
    _, rc = cluster_factory.start(n=1)
    assert rc[:]["configured"] == ["from default"]
    _, rc = cluster_factory.start(n=1, profile="lab")
    assert rc[:]["configured"] == ["from lab"]
    _, rc = cluster_factory.start(n=1, profile_dir=tmp_path / "profile_lab")
    assert rc[:]["configured"] == ["from lab"]
    with pytest.raises(ValueError, match=r"no IPython profile 'nope'.*ipython profile create"):
        jx.Cluster(n=1, profile="nope")
    with pytest.raises(TypeError, match="profile"):
        jx.Cluster(n=1, profile=3)
    with pytest.raises(ValueError, match="profile_dir"):
        jx.Cluster(n=1, profile_dir=tmp_path / "absent")


def test_engines_keep_cells_history_in_memory_unless_the_profile_names_a_file(
    cluster_factory, tmp_path, monkeypatch
):
    """As IPython Parallel's engines: no engine writes the profile's history.sqlite (nor
    runs a thread for it); a profile that names a history file keeps it."""
    monkeypatch.setenv("IPYTHONDIR", str(tmp_path))
    (tmp_path / "profile_default").mkdir()
    kept = tmp_path / "engines_history.sqlite"
    (tmp_path / "profile_kept").mkdir()
    (tmp_path / "profile_kept" / "ipython_config.py").write_text(
        f"c.HistoryManager.hist_file = {str(kept)!r}\n"
    )

    def history() -> tuple[str, list[str]]:
        import threading

        from IPython import get_ipython

        shell = get_ipython()
        return str(shell.history_manager.hist_file), [t.name for t in threading.enumerate()]

    _, rc = cluster_factory.start(n=1)
    rc[:].execute("x = 1", block=True)
    hist_file, threads = rc[0].apply_sync(history)
    assert hist_file == ":memory:"
    assert "IPythonHistorySavingThread" not in threads
    assert not (tmp_path / "profile_default" / "history.sqlite").exists()
    _, rc = cluster_factory.start(n=1, profile="kept")
    assert rc[0].apply_sync(history)[0] == str(kept)


def test_become_dask_takes_engines_added_later(cluster_factory):
    pytest.importorskip("distributed")
    cluster, rc = cluster_factory.start(n=1)
    added = cluster.start_engines_sync(1)
    cluster_factory.record(cluster, rc)
    assert rc.ids == [0, *added]
    dask_client = rc.become_dask()
    try:
        pids = sorted(dask_client.run(os.getpid).values())
        assert pids == sorted(rc.engine_info(i)["pid"] for i in rc.ids)
        assert dask_client.submit(lambda x: x + 1, 1).result(timeout=30) == 2
    finally:
        dask_client.close()
        rc.stop_dask()
    assert rc[:].apply_sync(lambda: "engines still serve") == ["engines still serve"] * 2


def test_blocking_clear_returns_nothing(rc):
    dv = rc[:]
    # (scatter returns a None per engine, as the seeds' example shows)
    assert dv.scatter("part", list(range(4)), block=True) == [None] * len(dv)
    assert dv.gather("part", block=True) == [0, 1, 2, 3]
    assert isinstance(dv.scatter("part", [1, 2], block=False), jx.AsyncResult)
    assert dv.clear(block=True) is None
    assert isinstance(dv.clear(block=False), jx.AsyncResult)


def test_wait_interactive_with_nothing_outstanding_returns_at_once(rc, capsys):
    rc.wait(timeout=10)
    started = time.monotonic()
    rc.wait_interactive()
    assert time.monotonic() - started < 1
    assert capsys.readouterr().out == ""


def test_the_first_client_in_ipython_registers_the_magics(rc, tmp_path):
    """As IPython Parallel's: %px works after connecting, without %load_ext."""
    script = tmp_path / "shell.py"
    script.write_text(
        "import sys\n"
        "from IPython.core.interactiveshell import InteractiveShell\n"
        "shell = InteractiveShell.instance()\n"
        "import jupyter_ext as ipp\n"
        "rc = ipp.Client(sys.argv[1])\n"
        "shell.run_line_magic('px', 'registered = 7')\n"
        "print('pulled', rc[:]['registered'])\n"
        "rc.close()\n"
    )
    done = subprocess.run(
        [sys.executable, str(script), rc.connection_file],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert f"pulled {[7] * len(rc.ids)}" in done.stdout


def test_cluster_file_is_written_while_running_and_reattaches(cluster_factory):
    cluster, _ = cluster_factory.start(n=1)
    path = cluster.cluster_file
    assert json.loads(path.read_text()) == cluster.to_dict()
    assert path.stat().st_mode & 0o077 == 0
    again = jx.Cluster.from_file(path)
    assert again.cluster_id == cluster.cluster_id and again.controller_pid == cluster.controller_pid
    assert jx.Cluster.from_file(cluster_id=cluster.cluster_id).controller_pid == (
        cluster.controller_pid
    )
    # IPython Parallel names the first argument cluster_file (a TypeError here before)
    by_name = jx.Cluster.from_file(cluster_file=path)
    assert by_name.controller_pid == cluster.controller_pid
    cluster.remove_cluster_file()
    assert not path.exists()
    cluster.update_cluster_file()  # only rewrites a file that is there
    assert not path.exists()
    cluster.write_cluster_file()
    assert path.exists()
    cluster.stop_cluster_sync()
    assert not path.exists()


def test_views_keep_their_engines_while_engines_come_and_go(cluster_factory):
    cluster, rc = cluster_factory.start(n=3)
    last, evens = rc[-1], rc[::2]
    assert (last.targets, evens.targets) == (2, [0, 2])
    rc.shutdown(targets=[2], block=True)
    deadline = time.monotonic() + 10
    while 2 in rc.ids and time.monotonic() < deadline:
        time.sleep(0.05)
    assert (rc.ids, len(rc), [v.targets for v in rc]) == ([0, 1], 2, [0, 1])
    assert rc[-1].targets == 1  # a new view sees the engines of now...
    assert (last.targets, evens.targets) == (2, [0, 2])  # ...the old ones keep theirs
    with pytest.raises(jx.EngineError):
        last.apply_sync(os.getpid)
    added = cluster.start_engines_sync(1)
    cluster_factory.record(cluster, rc)
    assert rc.ids == [0, 1, *added] and rc[-1].targets == added[0]
    # shutdown(hub=True) stops the engines and the controller too
    controller = cluster.controller_pid
    rc.shutdown(hub=True, block=True)
    assert wait_gone([controller], timeout=15) == []


def test_apply_takes_f_by_keyword_and_passes_a_parameter_named_f(rc):
    assert rc[0].apply_sync(f=lambda: "by keyword") == "by keyword"
    assert rc[0].apply_sync(lambda f: f * 2, f=21) == 42
    assert rc[0].apply_async(lambda f: f, f=1).get(10) == 1
    with pytest.raises(TypeError, match="function to call"):
        rc[0].apply_sync()


def test_block_is_taken_by_every_call(rc):
    dv, lv = rc[:], rc.load_balanced_view()
    n = len(rc)
    assert dv.push({"pb": 1}, block=True) == [None] * n
    assert isinstance(dv.push({"pb": 1}, block=False), jx.AsyncResult)
    assert dv.pull("pb", block=True) == [1] * n
    assert dv.pull("pb", block=False).get(10) == [1] * n
    assert isinstance(dv.execute("pc = 2", block=True), jx.AsyncResult)
    assert dv.map(abs, [-1, -2], block=True) == [1, 2]
    assert lv.map(abs, [-1, -2], block=False).get(10) == [1, 2]
    assert lv.map(abs, [-3], block=True) == [3]


def test_non_blocking_numpy_scatter_and_gather(rc):
    np = pytest.importorskip("numpy")
    dv = rc[:]
    data = np.arange(101, dtype=np.float64)
    dv.scatter("part", data, block=False).get(10)
    gathered = dv.gather("part", block=False)
    assert isinstance(gathered, jx.AsyncResult)
    result = gathered.get(10)
    assert isinstance(result, np.ndarray) and (result == data).all()


def test_rich_execute_results_keep_every_representation(rc):
    code = (
        "class Shown:\n"
        "    def _repr_png_(self): return b'\\x89PNG fake'\n"
        "    def _repr_html_(self): return '<b>shown</b>'\n"
        "Shown()"
    )
    ar = rc[0].execute(code, silent=False)
    ar.get(10)
    data = ar.execute_result["data"]
    assert {"image/png", "text/html", "text/plain"} <= set(data)
    assert data["text/html"] == "<b>shown</b>"


def test_remote_and_parallel_function_classes(rc):
    dv = rc[:]

    def double(x):
        return [2 * v for v in x] if isinstance(x, list) else 2 * x

    rf = jx.RemoteFunction(dv, lambda: "here", block=True)
    assert isinstance(dv.remote(block=True)(double), jx.RemoteFunction)
    assert rf() == ["here"] * len(rc)
    assert repr(rf).startswith("<RemoteFunction <lambda> on <DirectView")
    pf = jx.ParallelFunction(dv, double, block=True)
    assert repr(pf).startswith("<ParallelFunction double on ")
    assert pf(list(range(6))) == [0, 2, 4, 6, 8, 10]
    assert list(pf.map(range(4))) == [0, 2, 4, 6]
    lpf = rc.load_balanced_view().parallel(block=True)(double)
    assert isinstance(lpf, jx.ParallelFunction) and list(lpf.map(range(3))) == [0, 2, 4]


def test_wait_interactive_returns_when_asked(rc):
    ar = rc.load_balanced_view().map(time.sleep, [0.05, 3])
    started = time.monotonic()
    ar.wait_interactive(return_when=jx.FIRST_COMPLETED, widget=False)
    assert time.monotonic() - started < 2.5 and not ar.done()
    ar.get(10)


def test_start_cluster_returns_the_cluster_for_chaining(cluster_factory):
    """As IPython Parallel's (since 7.1): start_cluster() returned None, so
    ``Cluster(n=1).start_cluster_sync().connect_client_sync()`` failed."""
    cluster = cluster_factory(n=1)
    rc = cluster.start_cluster_sync().connect_client_sync()
    cluster_factory.record(cluster, rc)
    assert rc[:].apply_sync(abs, -1) == [1]
    cluster.stop_cluster_sync()
    assert asyncio.run(cluster.start_cluster()) is cluster and cluster.running
    cluster_factory.record(cluster, cluster.connect_client_sync())


def test_start_engines_defaults_to_the_clusters_n(cluster_factory):
    """IPython Parallel's start_engines(n=None) starts the cluster's n; ours required n
    (TypeError). n=0 starts none, as there."""
    cluster = cluster_factory(n=1)
    cluster.start_controller_sync()
    assert cluster.start_engines_sync(0) == []
    added = cluster.start_engines_sync()
    rc = cluster.connect_client_sync()
    cluster_factory.record(cluster, rc)
    assert added == rc.ids and len(added) == 1


def test_log_level_by_number_as_ipython_parallels(cluster_factory):
    """IPython Parallel's Cluster.log_level is an int (logging.DEBUG); a number was a
    ValueError here. Names in any case and numbers both reach the controller."""
    import logging

    import psutil

    assert jx.Cluster(log_level="warning").log_level == "WARNING"
    for bad in (15, True, "LOUD", None):
        with pytest.raises(ValueError, match="log_level must be a logging level"):
            jx.Cluster(log_level=bad)
    cluster = cluster_factory(n=0, log_level=logging.DEBUG)
    cluster.start_controller_sync()
    cluster_factory.record(cluster, cluster.connect_client_sync())
    argv = psutil.Process(cluster.controller_pid).cmdline()
    assert argv[argv.index("--log-level") + 1] == "DEBUG"


def test_start_cluster_checks_n_before_starting(cluster_factory):
    """start_cluster_sync(n=-1) started a cluster; n=True or 2.5 started a controller
    that exited with its usage text. Now TypeError/ValueError naming n, nothing started."""
    cluster = cluster_factory(n=1)
    for bad, error in ((-1, ValueError), (True, TypeError), (2.5, TypeError), ("1", TypeError)):
        with pytest.raises(error, match=r"^n must be"):
            cluster.start_cluster_sync(bad)
        with pytest.raises(error, match=r"^n must be"):
            cluster.start_and_connect_sync(bad)
        assert not cluster.running and cluster.controller is None


def test_stop_cluster_checks_its_timeout_before_closing_anything(cluster_factory):
    """stop_cluster_sync(timeout="5") closed the client, then failed with "unsupported
    operand type(s) for +", leaving the cluster running without its client."""
    cluster, rc = cluster_factory.start(n=1)
    for bad, error in (("5", TypeError), (None, TypeError), (float("nan"), ValueError)):
        with pytest.raises(error, match="timeout must be"):
            cluster.stop_cluster_sync(timeout=bad)
    assert cluster.running and rc[:].apply_sync(abs, -2) == [2]


def test_two_starts_at_once_start_one_controller(cluster_factory):
    """asyncio.gather(cluster.start_cluster(), cluster.start_cluster()) launched two
    controllers on one folder: both starts failed after start_timeout, engines not ready.
    The second now fails at once, and the first starts the cluster."""
    cluster = cluster_factory(n=1, start_timeout=15)

    async def both() -> list:
        starts = (cluster.start_cluster(), cluster.start_cluster())
        return await asyncio.gather(*starts, return_exceptions=True)

    started = time.monotonic()
    outcomes = asyncio.run(both())
    assert time.monotonic() - started < 10, outcomes
    errors = [o for o in outcomes if isinstance(o, Exception)]
    assert len(errors) == 1 and "is already " in str(errors[0]), outcomes  # starting
    assert cluster in outcomes and cluster.running
    rc = cluster.connect_client_sync()
    cluster_factory.record(cluster, rc)
    assert rc[:].apply_sync(abs, -3) == [3]


def test_the_error_module_of_ipython_parallel(rc):
    """``ipp.error.RemoteError`` and ``from ipyparallel.error import ...`` were an
    AttributeError and an ImportError; ``except ipp.error.TimeoutError`` must catch the
    timeout of ``get``."""
    import jupyter_ext as ipp
    from jupyter_ext.error import CompositeError, RemoteError, TaskAborted

    assert (RemoteError, CompositeError, TaskAborted) == (
        ipp.RemoteError,
        ipp.CompositeError,
        ipp.TaskAborted,
    )
    with pytest.raises(ipp.error.RemoteError):
        rc[0].apply_sync(lambda: 1 / 0)
    ar = rc[0].apply_async(time.sleep, 0.5)
    with pytest.raises(ipp.error.TimeoutError):
        ar.get(timeout=0.05)
    ar.get(timeout=10)
    assert not set(ipp.error.__all__) - set(vars(ipp.error))


def test_a_task_may_depend_on_a_purged_one(rc):
    """A task ``after=`` one whose result was purged failed with InvalidDependency
    ('unknown dependencies'); IPython Parallel's scheduler still counts it as done."""
    view = rc.load_balanced_view()
    first = view.apply_async(abs, -1)
    assert first.get(timeout=10) == 1
    rc.purge_results(first.msg_ids)
    with view.temp_flags(after=first.msg_ids):
        assert view.apply_sync(abs, -2) == 2
    rc.purge_results("all")
    with view.temp_flags(after=first.msg_ids):
        assert view.apply_sync(abs, -3) == 3


def test_numpy_integers_name_engines(rc):
    """``targets=np.int64(1)`` was refused as no engine id, ``np.arange(2)`` as 'no engine
    with id np.int64(0)', and ``rc[np.int64(1)]`` as no index: numpy's integers are ints
    wherever an engine id is (its bools are not)."""
    np = pytest.importorskip("numpy")
    ids = np.arange(len(rc.ids))
    assert rc[np.int64(1)].targets == 1
    pids = rc[:].apply_sync(os.getpid)
    assert rc.direct_view(targets=ids).apply_sync(os.getpid) == pids
    assert rc.load_balanced_view(targets=ids).apply_sync(os.getpid) in pids
    assert rc.direct_view(targets=np.int64(0)).apply_sync(os.getpid) == pids[0]
    assert set(rc.queue_status(targets=ids)) >= set(rc.ids)
    with pytest.raises(jx.InvalidTarget, match="True"):
        rc.direct_view(targets=[np.bool_(True)]).apply_sync(abs, 1)
