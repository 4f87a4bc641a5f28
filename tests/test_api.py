"""The public surface matches API.md's checklist (what is built so far, and what is not yet)."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest

import jupyter_ext as jx

# IPython Parallel 9.2's public names, from ../shared/IPP_API.md sections 2.1 to 2.14 (its
# rows, names only; test_ipp_compat.py tests what they do). What another issue builds is
# listed apart: the task database (resubmit) and IPython Parallel's low-level send API.
TOP_LEVEL = {
    "Client", "Cluster", "ClusterManager", "DirectView", "LoadBalancedView", "BroadcastView",
    "ViewExecutor", "AsyncResult", "AsyncMapResult", "AsyncHubResult", "RemoteFunction",
    "ParallelFunction", "remote", "parallel", "Dependency", "depend", "dependent", "require",
    "Reference", "PrePickled", "can", "uncan", "can_map", "uncan_map", "serialize_object",
    "deserialize_object", "pack_apply_message", "unpack_apply_message", "use_cloudpickle",
    "use_dill", "use_pickle", "interactive", "bind_kernel", "register_joblib_backend",
    "ALL_COMPLETED", "FIRST_COMPLETED", "FIRST_EXCEPTION", "version_info", "__version__",
    "IPythonError", "KernelError", "EngineError", "NoEnginesRegistered", "TaskAborted",
    "TaskTimeout", "TaskRejectError", "UnmetDependency", "ImpossibleDependency",
    "DependencyTimeout", "InvalidDependency", "RemoteError", "CompositeError",
    "AlreadyDisplayedError", "TimeoutError", "collect_exceptions", "wrap_exception",
    "unwrap_exception", "load_ipython_extension",
}  # fmt: skip
CLIENT = {
    "ids", "direct_view", "load_balanced_view", "broadcast_view", "executor", "activate",
    "wait", "wait_interactive", "wait_for_engines", "send_signal", "abort", "clear",
    "shutdown", "close", "get_result", "result_status", "queue_status", "db_query",
    "hub_history", "purge_results", "purge_local_results", "purge_hub_results",
    "purge_everything", "become_dask", "become_distributed", "stop_dask", "stop_distributed",
    "spin", "spin_thread", "stop_spin_thread", "block", "outstanding", "results", "metadata",
    "history", "debug", "profile", "cluster", "engine_info", "resubmit",
}  # fmt: skip
CLIENT_ELSEWHERE = {"send_apply_request", "send_execute_request"}
VIEW = {
    "block", "track", "targets", "label", "set_flags", "temp_flags", "apply", "apply_async",
    "apply_sync", "map", "map_async", "map_sync", "imap", "remote", "parallel", "wait",
    "abort", "shutdown", "get_result", "queue_status", "purge_results", "spin", "history",
    "outstanding", "results", "client", "executor",
}  # fmt: skip
DIRECT = {
    "execute", "run", "push", "update", "pull", "get", "scatter", "gather", "clear",
    "sync_imports", "importer", "use_cloudpickle", "use_dill", "use_pickle", "activate",
}  # fmt: skip
BALANCED = {"after", "follow", "timeout", "retries", "time_limit"}
ASYNC_RESULT = {
    "get", "get_dict", "result_dict", "r", "wait", "ready", "successful", "result",
    "exception", "done", "add_done_callback", "cancel", "running", "wait_interactive",
    "stream_output", "display_outputs", "wait_for_output", "abort", "sent", "wait_for_send",
    "msg_ids", "owner", "metadata", "progress", "elapsed", "serial_time", "wall_time",
    "timedelta", "split", "join",
}  # fmt: skip
CLUSTER_COROUTINES = {
    "start_cluster", "start_controller", "stop_controller", "start_engines", "stop_engines",
    "stop_cluster", "restart_engines", "signal_engines", "start_and_connect",
    "connect_client", "stop_engine", "restart_engine", "signal_engine",
}  # fmt: skip


def test_top_level_names():
    assert set(jx.__all__) >= TOP_LEVEL - {"__version__"}
    for name in TOP_LEVEL:
        assert hasattr(jx, name), name


def test_client_view_and_result_members():
    client = {n for n in CLIENT if n in jx.Client.__dict__ or hasattr(jx.Client, n)}
    instance_attrs = {"block", "debug", "profile", "cluster"}  # set in __init__
    assert CLIENT - client <= instance_attrs
    assert not CLIENT_ELSEWHERE & set(dir(jx.Client)), "built now: move it to CLIENT"
    per_view = {"block", "track", "targets", "label", "client", "history", "transport"}
    dview_attrs = set(dir(jx.DirectView)) | per_view
    assert dview_attrs >= VIEW | DIRECT
    lb_attrs = set(dir(jx.LoadBalancedView)) | per_view
    assert lb_attrs >= VIEW and "register_joblib_backend" in lb_attrs
    assert set(jx.LoadBalancedView._flag_names) >= BALANCED
    assert set(dir(jx.AsyncResult)) | {"msg_ids"} >= ASYNC_RESULT
    assert {"check", "unreachable", "as_dict"} <= set(dir(jx.Dependency))
    assert {"render_traceback", "print_traceback"} <= set(dir(jx.RemoteError))
    assert {"raise_exception", "print_traceback", "tb_limit"} <= set(dir(jx.CompositeError))
    assert {"cancel"} <= set(dir(jx.LazyMapIterator))
    assert {"submit", "map", "shutdown", "__enter__"} <= set(dir(jx.ViewExecutor))
    assert {"load_clusters", "new_cluster", "get_cluster", "remove_cluster"} <= set(
        dir(jx.ClusterManager)
    )
    assert {"to_dict", "from_dict", "from_file"} <= set(dir(jx.Cluster))


def test_the_lists_follow_the_reference():
    """When ../shared/IPP_API.md is at hand (a checkout beside it), every top-level name of
    its section 2.1 is in TOP_LEVEL (so the reference and this list cannot drift)."""
    reference = Path(__file__).resolve().parents[2] / "shared" / "IPP_API.md"
    if not reference.is_file():
        pytest.skip("../shared/IPP_API.md is not beside this checkout")
    text = reference.read_text()
    section = text[text.index("### 2.1 ") : text.index("### 2.2 ")]
    named = set()
    for row in section.splitlines():
        if row.startswith("| `"):
            first = row.split("|")[1]
            named |= {n.split("(")[0] for n in re.findall(r"`([^`]+)`", first)}
    named -= {"ipyparallel"}
    assert named <= TOP_LEVEL, sorted(named - TOP_LEVEL)


def test_cluster_coroutines_have_written_out_blocking_twins():
    for name in CLUSTER_COROUTINES:
        coro = getattr(jx.Cluster, name)
        twin = getattr(jx.Cluster, f"{name}_sync")
        assert inspect.iscoroutinefunction(coro), name
        assert not inspect.iscoroutinefunction(twin), name
        assert name in jx.Cluster.__dict__ and f"{name}_sync" in jx.Cluster.__dict__


def test_errors_subclass_builtins_where_meaning_fits():
    assert issubclass(jx.TaskTimeout, TimeoutError)
    assert issubclass(jx.CompositeError, jx.RemoteError)
    assert issubclass(jx.InvalidTarget, ValueError)
    for cls in (jx.EngineError, jx.TaskAborted, jx.DependencyTimeout, jx.ImpossibleDependency):
        assert issubclass(cls, jx.RemoteError)
        assert (cls.__doc__ or "").startswith("Raised when")
