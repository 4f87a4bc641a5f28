"""Load-balanced views with real engines: map, dependencies, retries, limits, executors."""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import logging
import os
import signal
import sys
import threading
import time
from functools import reduce
from math import sqrt

import cloudpickle
import numpy as np
import pytest
import zmq

import jupyter_ext as jx

cloudpickle.register_pickle_by_value(sys.modules[__name__])


@pytest.fixture
def view(rc):
    v = rc.load_balanced_view()
    yield v
    rc.wait(timeout=30)


def test_apply_runs_on_some_engine(view, rc):
    pids = {rc.engine_info(i)["pid"] for i in rc.ids}
    assert view.apply_sync(os.getpid) in pids
    ar = view.apply_async(lambda x: x + 1, 1)
    assert ar.get(10) == 2 and ar.metadata["engine_id"] in rc.ids
    assert "<LoadBalancedView" in repr(view)


def test_no_data_movement_on_a_load_balanced_view(view):
    for name in ("push", "pull", "scatter", "gather"):
        with pytest.raises(AttributeError, match="DirectView"):
            getattr(view, name)


def test_map_iterates_as_results_arrive_seed(view):
    def sleep_here(t):
        import time

        time.sleep(t)
        return os.getpid(), t

    amr = view.map(sleep_here, [0.01 * t for t in range(20)])
    assert isinstance(amr, jx.AsyncMapResult) and len(amr) == 20
    got = [r[1] for r in amr]
    assert got == [0.01 * t for t in range(20)]

    amr = view.map(sleep_here, [0.01 * t for t in range(20)], chunksize=4)
    assert len(amr.msg_ids) == 5 and len(amr) == 20
    assert [r[1] for r in amr] == [0.01 * t for t in range(20)]

    amr = view.map(sleep_here, [0.05 * t for t in range(8, 0, -1)], ordered=False, chunksize=2)
    slept = [r[1] for r in amr]
    assert sorted(slept) == sorted(0.05 * t for t in range(8, 0, -1))
    assert slept != [0.05 * t for t in range(8, 0, -1)]  # completion order, not submission
    # get() gives the input's order, as IPython Parallel's: ordered is iteration's order
    assert [r[1] for r in amr.get()] == [0.05 * t for t in range(8, 0, -1)]
    assert [r[1] for r in view.map_sync(sleep_here, [0.2, 0.01], ordered=False)] == [0.2, 0.01]


def test_one_line_rms_with_builtin_reduce(view):
    X = np.linspace(0, 100)
    add = lambda a, b: a + b  # noqa: E731
    sq = lambda x: x * x  # noqa: E731
    local = sqrt(reduce(add, map(sq, X)) / len(X))
    remote = sqrt(reduce(add, view.map(sq, X)) / len(X))
    assert remote == pytest.approx(local) == pytest.approx(58.028845747399714)


def test_map_progress_counts_items(view):
    amr = view.map(abs, range(100), chunksize=10)
    amr.get(20)
    assert amr.progress == 100 and len(amr) == 100


def test_map_return_exceptions(view):
    def inv(x):
        return 1 / x

    with pytest.raises(jx.CompositeError):
        view.map_sync(inv, [1, 0, 2])
    out = view.map_sync(inv, [1, 0, 2], return_exceptions=True, chunksize=3)
    assert out[0] == 1 and out[2] == 0.5
    assert isinstance(out[1], jx.RemoteError) and out[1].ename == "ZeroDivisionError"


def test_imap_consumes_an_infinite_generator_lazily(view):
    consumed = []

    def numbers():
        for i in itertools.count():
            consumed.append(i)
            yield i

    results = view.imap(lambda x: x * 2, numbers(), max_outstanding=8)
    first = list(itertools.islice(results, 20))
    assert first == [2 * i for i in range(20)]
    assert len(consumed) < 40
    unordered = view.imap(abs, range(-30, 0), ordered=False, chunksize=3)
    assert sorted(unordered) == list(range(1, 31))


def test_targets_restrict_engines(rc):
    v = rc.load_balanced_view(targets=[1])
    assert set(v.map_sync(lambda _: __import__("os").getpid(), range(10))) == {
        rc.engine_info(1)["pid"]
    }
    ex_even = rc.load_balanced_view(targets=rc.ids[::2]).executor
    assert set(ex_even.map(lambda x: os.getpid(), range(10))) == {rc.engine_info(0)["pid"]}
    with pytest.raises(jx.InvalidTarget, match="no engine with id 7"):
        rc.load_balanced_view(targets=[7]).apply_sync(abs, 1)


def test_after_and_follow(view, rc):
    first = view.apply_async(lambda: (time.sleep(0.3), time.time())[1])
    with view.temp_flags(after=[first]):
        later = view.apply_async(time.time)
    assert later.get(10) >= first.get(10)
    with view.temp_flags(follow=first):
        where = view.apply_async(os.getpid)
    assert where.get(10) == rc.engine_info(first.metadata["engine_id"])["pid"]
    dep = jx.Dependency([first, later], all=True)
    with view.temp_flags(after=dep):
        assert view.apply_sync(lambda: "after both") == "after both"


def test_failed_dependency_is_impossible(view):
    bad = view.apply_async(lambda: 1 / 0)
    with pytest.raises(jx.RemoteError):
        bad.get(10)
    with view.temp_flags(after=bad), pytest.raises(jx.ImpossibleDependency, match=bad.msg_ids[0]):
        view.apply_sync(abs, 1)
    with view.temp_flags(after=jx.Dependency(bad, success=False, failure=True)):
        assert view.apply_sync(lambda: "ran after the failure") == "ran after the failure"


def test_dependency_timeout(view):
    slow = view.apply_async(time.sleep, 2)
    with view.temp_flags(after=slow, timeout=0.2), pytest.raises(jx.DependencyTimeout):
        view.apply_sync(abs, 1)
    slow.get(10)


def test_unknown_dependency_is_invalid(view):
    with view.temp_flags(after=["not-a-msg-id"]), pytest.raises(jx.InvalidDependency):
        view.apply_sync(abs, 1)


def test_dag_of_dependencies(view):
    """A small DAG (as in IPython Parallel's dependency docs): parents finish first."""
    edges = {"a": [], "b": ["a"], "c": ["a"], "d": ["b", "c"], "e": ["d"]}
    results = {}
    for node in ["a", "b", "c", "d", "e"]:
        deps = [results[p] for p in edges[node]]
        with view.temp_flags(after=deps):
            results[node] = view.apply_async(
                lambda name: (time.sleep(0.05), name, time.time())[1:], node
            )
    done = {k: ar.get(20)[1] for k, ar in results.items()}
    for node, parents in edges.items():
        for parent in parents:
            started = results[node].metadata["started"]
            assert started >= results[parent].metadata["completed"], (node, parent)
            assert done[node] >= done[parent]


def test_require_and_depend(view, rc):
    @jx.require("json")
    def uses_json():
        import json

        return json.dumps([1])

    assert view.apply_sync(uses_json) == "[1]"

    @jx.require("module_that_does_not_exist_anywhere")
    def impossible():
        return 1

    with pytest.raises(jx.ImpossibleDependency):
        view.apply_sync(impossible)

    target_pid = rc.engine_info(1)["pid"]

    def on_engine(pid):
        import os

        return os.getpid() == pid

    @jx.depend(on_engine, target_pid)
    def where():
        return os.getpid()

    for _ in range(4):
        assert view.apply_sync(where) == target_pid


def test_depend_refuses_only_a_false_check(view, rc):
    """A check returning None (one that only imports, say) refused the task everywhere
    (ImpossibleDependency): any falsy result counted as unmet, where IPython Parallel
    refuses only on False."""

    def imports_json():
        import json  # noqa: F401

    @jx.depend(imports_json)
    def runs():
        return "ran"

    assert view.apply_sync(runs) == "ran"
    assert rc[:].apply_sync(jx.depend(lambda: 0)(lambda: 1)) == [1, 1]

    @jx.depend(lambda: np.bool_(False))
    def never():
        return 1

    with pytest.raises(jx.ImpossibleDependency):
        view.apply_sync(never)


def test_after_takes_a_dependency_in_its_dict_form(view):
    """after=Dependency(...).as_dict(), or IPython Parallel's dict form ({"dependencies":
    [...], "all": ...}), was taken as its keys: the task failed with InvalidDependency
    (unknown dependencies: all, dependencies...)."""
    failed = view.apply_async(lambda: 1 / 0)
    with pytest.raises(jx.RemoteError):
        failed.get(10)
    for form in (
        jx.Dependency(failed, failure=True).as_dict(),
        {"dependencies": failed.msg_ids, "all": True, "success": True, "failure": True},
    ):
        with view.temp_flags(after=form):
            assert view.apply_sync(lambda: "ran") == "ran"
    only_success = {"dependencies": failed.msg_ids}
    with view.temp_flags(after=only_success), pytest.raises(jx.ImpossibleDependency):
        view.apply_sync(lambda: "ran")
    with pytest.raises(ValueError, match=r"not \['ids'\]"):
        view.set_flags(after={"ids": failed.msg_ids})


def test_retries_resubmit_failed_tasks(view, rc):
    rc[:].execute("attempts = 0", block=True)

    @jx.interactive
    def flaky():
        global attempts
        attempts += 1
        if attempts < 2:
            raise RuntimeError("first try fails")
        return "ok"

    with view.temp_flags(retries=3):
        assert view.apply_sync(flaky) == "ok"
    rc[:].execute("attempts = 0", block=True)
    with view.temp_flags(retries=0), pytest.raises(jx.RemoteError, match="first try fails"):
        view.apply_sync(flaky)


def test_time_limit_interrupts_and_fails_with_task_timeout(view):
    t0 = time.monotonic()
    with view.temp_flags(time_limit=0.5), pytest.raises(jx.TaskTimeout):
        view.apply_sync(time.sleep, 30)
    assert time.monotonic() - t0 < 10
    assert view.apply_sync(lambda: "engine still usable") == "engine still usable"


def _stubborn_sleep(seconds):
    """Sleeps, and carries on after the first KeyboardInterrupt."""
    import time

    end = time.monotonic() + seconds
    caught = 0
    while time.monotonic() < end:
        try:
            time.sleep(0.05)
        except KeyboardInterrupt:
            caught += 1
            if caught > 1:
                raise


def test_a_task_that_catches_the_first_interrupt_still_ends_at_its_time_limit(view):
    """Over its limit, a task gets an interrupt every REPEAT_INTERRUPT seconds while it
    still runs (one interrupt, as before, left it running for its 30 s)."""
    t0 = time.monotonic()
    with view.temp_flags(time_limit=0.3), pytest.raises(jx.TaskTimeout):
        view.apply_sync(_stubborn_sleep, 30)
    assert time.monotonic() - t0 < 10


class _Engine:
    """What the watchdog sees of an engine: the task running, and the interrupts it got."""

    def __init__(self):
        self.task: str | None = None
        self.fired: list[tuple[str | None, float]] = []

    def running(self):
        return self.task

    def fire(self):
        self.fired.append((self.task, time.monotonic()))


def _until(predicate, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def test_the_watchdog_interrupts_a_task_over_its_limit_and_again_while_it_runs(monkeypatch):
    from kernel_engine.engine import lane

    monkeypatch.setattr(lane, "REPEAT_INTERRUPT", 0.05)
    engine = _Engine()
    dog = lane.Watchdog(engine.running, engine.fire)
    engine.task = "a"
    t0 = time.monotonic()
    dog.arm("a", 0.1)
    _until(lambda: len(engine.fired) >= 3)
    assert dog.disarm("a") is True  # (it ran out)
    assert engine.fired[0][1] - t0 >= 0.1
    assert {task for task, _ in engine.fired} == {"a"}
    count = len(engine.fired)
    time.sleep(0.2)
    assert len(engine.fired) == count  # (disarmed: no more)
    assert dog.disarm("a") is False  # (told once)


def test_the_watchdog_leaves_tasks_that_end_in_time_alone():
    from kernel_engine.engine import lane

    def watchdogs():
        return [t.name for t in threading.enumerate()].count("px-time-limits")

    before = watchdogs()
    engine = _Engine()
    dog = lane.Watchdog(engine.running, engine.fire)
    for i in range(2000):  # (one thread for every task, however many)
        engine.task = f"t{i}"
        dog.arm(engine.task, 0.05)
        assert dog.disarm(engine.task) is False
        engine.task = None
    assert watchdogs() == before + 1
    time.sleep(0.2)
    assert engine.fired == []
    # a task that ended but is not disarmed yet (its engine runs another): not interrupted
    engine.task = "ended"
    dog.arm("ended", 0.05)
    engine.task = "next"
    time.sleep(0.2)
    assert engine.fired == []
    assert dog.disarm("ended") is False


def test_the_watchdog_wakes_for_an_earlier_deadline():
    """A task armed with a shorter limit than the one the thread sleeps toward is
    interrupted at its own deadline, not the earlier task's."""
    from kernel_engine.engine import lane

    engine = _Engine()
    dog = lane.Watchdog(engine.running, engine.fire)
    engine.task = "long"
    dog.arm("long", 60)
    time.sleep(0.05)  # (the thread now sleeps toward 60 s)
    dog.disarm("long")
    engine.task = "short"
    t0 = time.monotonic()
    dog.arm("short", 0.1)
    _until(lambda: engine.fired, timeout=5)
    assert engine.fired[0][0] == "short" and engine.fired[0][1] - t0 < 2
    assert dog.disarm("short") is True


def _subshell_cell(kc, subshell_id, code):
    """Run ``code`` in a kernel subshell (a thread of its own, beside the main thread)."""
    msg = kc.session.msg(
        "execute_request",
        {"code": code, "silent": False, "store_history": False, "user_expressions": {}},
    )
    msg["header"]["subshell_id"] = subshell_id
    kc.shell_channel.send(msg)
    deadline = time.monotonic() + 10
    while True:
        reply = kc.shell_channel.get_msg(timeout=max(0.1, deadline - time.monotonic()))
        if reply["parent_header"].get("msg_id") == msg["header"]["msg_id"]:
            return reply["content"]


def test_a_cell_in_a_kernel_subshell_leaves_a_tasks_time_limit_alone(rc):
    """A subshell's cell (a frontend attached to the engine, on ipykernel 7) took the slot
    of the task the main thread ran, and cleared it at its end: the watchdog found the task
    no longer running, and it ran to its end past its limit."""
    from jupyter_client import BlockingKernelClient

    context = zmq.Context()
    kc = BlockingKernelClient(context=context)
    try:
        kc.load_connection_info(rc.engine_info(0)["connection_info"])
        kc.start_channels()
        kc.wait_for_ready(timeout=10)
        kc.control_channel.send(kc.session.msg("create_subshell_request", {}))
        subshell_id = kc.control_channel.get_msg(timeout=10)["content"]["subshell_id"]
        view = rc.load_balanced_view(targets=[0])
        with view.temp_flags(time_limit=0.5):
            ar = view.apply_async(time.sleep, 10)
        time.sleep(0.2)  # (the task runs)
        assert _subshell_cell(kc, subshell_id, "1 + 1")["status"] == "ok"
        t0 = time.monotonic()
        with pytest.raises(jx.TaskTimeout):
            ar.get(15)
        assert time.monotonic() - t0 < 3
    finally:
        kc.stop_channels()
        context.destroy(linger=0)
    assert rc[0].apply_sync(abs, -3) == 3


def _nap_and_say(i):
    import time

    time.sleep(0.3)
    return i


def test_a_time_limit_counts_the_run_not_the_wait(view):
    """A task's time limit counts from its start on the engine: four 0.3 s tasks with
    0.5 s limits queued on one engine all run (counted from their dispatch, the last
    three ran out of time waiting behind each other)."""
    with view.temp_flags(targets=[0], time_limit=0.5):
        ars = [view.apply_async(_nap_and_say, i) for i in range(4)]
    assert [ar.get(20) for ar in ars] == [0, 1, 2, 3]
    with view.temp_flags(targets=[0]):
        first = view.apply_async(time.sleep, 0.6)
        with view.temp_flags(time_limit=0.3):
            limited = view.apply_async(time.time)  # (waits for first to end)
    started = limited.get(10)
    assert first.get(10) is None
    assert started >= first.metadata["completed"].timestamp() - 0.01


def _counted_sleep(seconds):
    import time

    from IPython import get_ipython

    ns = get_ipython().user_ns
    ns["timed_runs"] = ns.get("timed_runs", 0) + 1
    time.sleep(seconds)


def test_a_task_over_its_time_limit_is_not_retried(view, rc):
    rc[0].execute("timed_runs = 0", block=True)
    with view.temp_flags(targets=[0], time_limit=0.5, retries=2):
        ar = view.apply_async(_counted_sleep, 5)
    with pytest.raises(jx.TaskTimeout, match=r"0\.5s time limit"):
        ar.get(10)
    assert rc[0].pull("timed_runs", block=True) == 1


def _raise_own_task_timeout():
    from IPython import get_ipython

    ns = get_ipython().user_ns
    ns["timed_runs"] = ns.get("timed_runs", 0) + 1

    class TaskTimeout(Exception):  # (a user's class of that name: curio has one)
        pass

    raise TaskTimeout("mine")


def test_a_users_exception_named_like_a_verdict_is_retried(view, rc):
    rc[0].execute("timed_runs = 0", block=True)
    with view.temp_flags(targets=[0], retries=2):
        ar = view.apply_async(_raise_own_task_timeout)
    with pytest.raises(jx.RemoteError, match="mine"):
        ar.get(10)
    assert rc[0].pull("timed_runs", block=True) == 3


def test_an_interrupted_task_is_not_retried_elsewhere(view, rc):
    """An interrupt that names a running task ends it: with retries left it used to run
    again on another engine, after the user's Ctrl-C had returned."""
    rc[:].execute("timed_runs = 0", block=True)
    with view.temp_flags(retries=1):
        ar = view.apply_async(_counted_sleep, 3)
    time.sleep(0.5)  # (running: a pull would wait behind it)
    assert len(rc.transport.interrupt(ar.msg_ids)) == 1
    with pytest.raises(jx.RemoteError, match="KeyboardInterrupt"):
        ar.get(10)
    time.sleep(0.5)
    assert sum(rc[:].pull("timed_runs", block=True)) == 1


def test_ctrl_c_on_a_task_still_queued_returns_at_once_and_it_never_runs(view, rc):
    """Ctrl-C in a wait interrupts the work's engines and waits a grace for them; a task
    not on an engine yet (here it waits for a dependency) is aborted, so the wait ends at
    once instead of after the grace, and the task does not run later."""
    blocker = rc[0].apply_async(time.sleep, 3)
    with view.temp_flags(after=[blocker]):
        queued = view.apply_async(os.getpid)
    timer = threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGINT))
    started = time.monotonic()
    timer.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            queued.get(30)
    finally:
        timer.cancel()
    assert time.monotonic() - started < 2.5
    with pytest.raises(jx.TaskAborted):
        queued.get(5)
    blocker.get(10)


def test_abort_queued_tasks(view, rc):
    blockers = [view.apply_async(time.sleep, 0.5) for _ in range(len(rc) * 20)]
    last = view.apply_async(lambda: "never")
    last.abort()
    with pytest.raises(jx.TaskAborted):
        last.get(20)
    for b in blockers:
        b.abort()
    rc.wait(blockers, timeout=30)


def test_remote_and_parallel_decorators(rc):
    dview = rc[:]
    lview = rc.load_balanced_view()

    @dview.remote(block=True)
    def getpid():
        import os

        return os.getpid()

    assert sorted(getpid()) == sorted(rc.engine_info(i)["pid"] for i in rc.ids)

    @lview.remote(block=True)
    def double(x):
        return 2 * x

    assert double(21) == 42

    @dview.parallel(block=True)
    def pmul(a, b):
        return a * b

    A = np.arange(10.0)
    B = np.arange(10.0) + 1
    assert np.allclose(pmul(A, B), A * B)
    assert pmul.map([1, 2, 3], [4, 5, 6]) == [4, 10, 18]

    @jx.parallel(lview, block=True)
    def lens(strings):
        return [len(s) for s in strings]

    assert lens(["a", "bb", "ccc", "dddd"]) == [1, 2, 3, 4]

    @jx.remote(dview, block=True)
    def hello():
        return "hi"

    assert hello() == ["hi", "hi"]


def test_futures_await_and_callbacks(view):
    async def main():
        return await view.apply_async(lambda: 5), await asyncio.wrap_future(view.apply(abs, -3))

    assert asyncio.run(asyncio.wait_for(main(), 20)) == (5, 3)
    got = concurrent.futures.Future()
    view.apply_async(lambda: "cb").add_done_callback(lambda f: got.set_result(f.result()))
    assert got.result(10) == "cb"


def test_executors(rc):
    ex = rc.executor()
    assert isinstance(ex, concurrent.futures.Executor)
    assert ex.submit(pow, 2, 10).result(10) == 1024
    assert list(ex.map(str, range(5))) == ["0", "1", "2", "3", "4"]
    with rc[:].executor as dex:
        assert dex.submit(abs, -1).result(10) == [1, 1]
    ex.shutdown()
    with pytest.raises(RuntimeError):
        ex.submit(abs, 1)


def test_executor_comparison_seed(rc):
    """Process, thread and jupyter_ext executors (and dask's, if installed) agree."""
    from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor

    from task_mod import task

    # the seed's task module sits beside the notebook: make it importable on the engines
    tests_dir = os.path.dirname(os.path.abspath(__file__))
    rc[:].execute(f"import sys; sys.path.insert(0, {tests_dir!r})", block=True)
    sizes = np.logspace(10, 14, 6, base=2, dtype=int)
    ref = list(map(task, sizes))
    N = 2
    executors = [ThreadPoolExecutor(N), ProcessPoolExecutor(N), rc.executor(targets=range(N))]
    distributed_client = None
    try:
        import distributed  # noqa: F401 - dask is optional, as in the seed
    except ImportError:
        pass
    else:
        distributed_client = rc.become_dask()
        executors.append(distributed_client.get_executor())
    try:
        for executor in executors:
            assert list(executor.map(str, range(5))) == ["0", "1", "2", "3", "4"]
            assert list(executor.map(task, sizes)) == ref
    finally:
        for executor in executors[:2]:
            executor.shutdown()
        if distributed_client is not None:
            distributed_client.close()
            rc.stop_dask()


def test_get_result_from_another_client(rc):
    ar = rc.load_balanced_view().apply_async(lambda: "shared")
    ar.get(10)
    other = jx.Client(rc.connection_file)
    try:
        hub_ar = other.get_result(ar.msg_ids[0])
        assert isinstance(hub_ar, jx.AsyncHubResult)
        assert hub_ar.get(10) == "shared"
        assert rc.get_result(ar.msg_ids[0]).get(10) == "shared"
    finally:
        other.close()


def test_killed_engine_in_a_map_with_retries_completes_every_item(cluster_factory):
    _, rc = cluster_factory.start(2)
    v = rc.load_balanced_view()
    v.retries = 1
    amr = v.map(lambda x: (time.sleep(0.05), x)[1], range(60))
    while amr.progress < 10:
        time.sleep(0.01)
    os.kill(rc.engine_info(1)["pid"], signal.SIGKILL)
    assert amr.get(60) == list(range(60))


def test_tasks_left_waiting_when_every_engine_died_are_named_and_can_be_aborted(
    cluster_factory, caplog
):
    """A retried task whose every engine died waits for one to register (as a new one
    may); the client says so once, rather than leave a wait without end unexplained,
    and ``abort`` ends them."""
    _, rc = cluster_factory.start(2)
    v = rc.load_balanced_view()
    v.retries = 1
    with caplog.at_level(logging.WARNING, logger="jupyter_ext"):
        amr = v.map(lambda x: os._exit(3), range(4))
        deadline = time.monotonic() + 30
        while rc.ids and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not rc.ids
        deadline = time.monotonic() + 10
        while "every engine is gone" not in caplog.text and time.monotonic() < deadline:
            time.sleep(0.05)
    told = [r.getMessage() for r in caplog.records if "every engine is gone" in r.getMessage()]
    assert len(told) == 1, told
    assert "exited with code 3" in told[0] and "rc.abort()" in told[0]
    assert not amr.wait(0.5)
    rc.abort(amr)
    assert amr.wait(10)
    with pytest.raises(jx.CompositeError) as info:
        amr.get()
    assert any(isinstance(e, jx.TaskAborted) for e in info.value.elist)


def test_tasks_that_end_with_the_last_engine_are_not_said_to_wait(cluster_factory, caplog):
    """The controller publishes an engine's end before the replies of the tasks that end
    with it: the client counted those as waiting in the queue when the last engine went
    (80 said to wait of a map's 80 tasks, 64 of which had just failed with their engines;
    a warning for a map whose every task failed). Only what still waits is counted."""
    cluster, rc = cluster_factory.start(2)
    v = rc.load_balanced_view()
    v.retries = 0

    def unassigned() -> int:
        return int(rc.queue_status()["unassigned"])

    def told() -> list[str]:
        return [r.getMessage() for r in caplog.records if "every engine is gone" in r.getMessage()]

    with caplog.at_level(logging.WARNING, logger="jupyter_ext"):
        amr = v.map(time.sleep, [60] * 80)  # (32 to an engine at most: the rest wait)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            status = rc.queue_status()
            if sum(status[i]["tasks"] for i in rc.ids) + status["unassigned"] == 80:
                break
            time.sleep(0.05)
        waiting = unassigned()
        assert 0 < waiting < 80
        rc.shutdown()
        assert not rc.ids
        assert unassigned() == waiting  # (its answer comes after the client's own question's)
        assert len(told()) == 1, told()
        assert f"{waiting} load-balanced task(s)" in told()[0], told()
        assert len(set(amr.msg_ids) & rc.outstanding) == waiting  # (the rest failed)
        rc.abort(amr)
        assert amr.wait(10)

        # engines again, then every task ends with them: nothing waits, nothing is said
        cluster.start_engines_sync(1)
        caplog.clear()
        amr = v.map(time.sleep, [60] * 3)
        deadline = time.monotonic() + 20
        while rc.queue_status()[rc.ids[0]]["tasks"] != 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        rc.shutdown()
        assert amr.wait(10)
        assert unassigned() == 0
        assert told() == []


def test_killed_engine_in_a_map_without_retries_fails_lost_items(cluster_factory):
    _, rc = cluster_factory.start(2)
    v = rc.load_balanced_view()
    amr = v.map(lambda x: (time.sleep(0.05), x)[1], range(60))
    while amr.progress < 10:
        time.sleep(0.01)
    os.kill(rc.engine_info(1)["pid"], signal.SIGKILL)
    assert amr.wait(30)
    with pytest.raises(jx.CompositeError) as info:
        amr.get()
    assert all(isinstance(e, jx.EngineError) for e in info.value.elist)
    out = v.map_sync(lambda x: x, range(60), return_exceptions=True)
    assert out == list(range(60))


def test_results_arrive_one_by_one_not_per_batch(view):
    """Batches go to engines for throughput, but each result comes back when it is done."""
    amr = view.map(lambda x: (time.sleep(0.1), x)[1], range(20))
    seen = set()
    deadline = time.monotonic() + 20
    while not amr.done() and time.monotonic() < deadline:
        seen.add(amr.progress)
        time.sleep(0.01)
    assert amr.get(5) == list(range(20))
    assert len({p for p in seen if 0 < p < 20}) >= 5, sorted(seen)


def _interrupted_after(seconds: float, iterate) -> float:
    """Seconds until ``iterate()`` raised KeyboardInterrupt, Ctrl-C coming ``seconds`` in."""
    timer = threading.Timer(seconds, os.kill, (os.getpid(), signal.SIGINT))
    started = time.monotonic()
    timer.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            iterate()
    finally:
        timer.cancel()
    return time.monotonic() - started


@pytest.mark.parametrize("how", ["map", "imap", "imap-unordered", "apply"])
def test_ctrl_c_while_iterating_results_stops_the_engines_work(view, rc, how):
    """Ctrl-C in ``get()`` interrupts the engines (and aborts what is queued); in a loop
    over a map's results, or over imap, it only stopped the loop, and the engines ran on
    (here for 20 s) with the rest of the work queued behind them."""
    if how == "map":
        results = view.map(time.sleep, [20] * 4)
    elif how == "apply":
        results = rc[:].apply_async(time.sleep, 20)
    else:
        results = view.imap(time.sleep, [20] * 4, ordered=how == "imap")
    took = _interrupted_after(0.5, lambda: list(results))
    assert took < 10
    assert rc.wait(timeout=5), "the engines still run the work"
    if how.startswith("imap"):
        assert list(results) == []  # (ended: nothing more submitted or yielded)


@pytest.mark.parametrize("error", [RuntimeError, ValueError])
@pytest.mark.parametrize("ordered", [True, False])
def test_imap_yields_what_came_before_a_failing_input_then_raises_its_error(view, error, ordered):
    """A RuntimeError from the input was taken as its end (the rest silently lost); any
    other error was raised at once, and the results of what was submitted before it were
    lost. Now those results come first, then the input's own error."""

    def numbers():
        yield from range(10)
        raise error("the input broke")

    got = []
    with pytest.raises(error, match="the input broke"):
        for r in view.imap(lambda x: 2 * x, numbers(), chunksize=3, ordered=ordered):
            got.append(r)
    assert (got if ordered else sorted(got)) == [2 * i for i in range(10)]
    stops = view.imap(lambda x, y: x + y, iter(range(5)), iter(range(100)), chunksize=2)
    assert list(stops) == [0, 2, 4, 6, 8]  # (the shortest input ends it, as zip)


def test_a_pending_hub_result_ends_however_it_is_waited_for(rc):
    """Another client's task, still running: only get() and wait() asked the controller,
    so iterating, awaiting or concurrent.futures.wait waited for ever."""
    ar = rc.load_balanced_view().apply_async(lambda: (time.sleep(1.5), "late")[1])
    other = jx.Client(rc.connection_file)
    try:
        by_futures, by_loop, by_await = (other.get_result(ar.msg_ids[0]) for _ in range(3))
        assert isinstance(by_futures, jx.AsyncHubResult) and not by_futures.done()
        got: list = []
        looping = threading.Thread(target=lambda: got.extend(by_loop), daemon=True)
        looping.start()

        async def awaited():
            return await asyncio.wait_for(asyncio.ensure_future(by_await), 10)

        assert asyncio.run(awaited()) == "late"
        done, _ = concurrent.futures.wait([by_futures], 10)
        assert done == {by_futures} and by_futures.result() == "late"
        looping.join(10)
        assert got == ["late"]
        ended = [t for t in threading.enumerate() if t.name == "jupyter-px-hub-poll"]
        for t in ended:  # (the poller stops once none is pending)
            t.join(5)
            assert not t.is_alive()
    finally:
        other.close()


def test_a_hub_result_waits_as_return_when_says(rc):
    """wait(return_when=FIRST_COMPLETED) on a hub result waited for all of them."""
    view = rc.load_balanced_view()
    quick, slow = view.apply_async(abs, -1), view.apply_async(time.sleep, 4)
    quick.get(10)
    other = jx.Client(rc.connection_file)
    try:
        both = other.get_result(quick.msg_ids + slow.msg_ids)
        started = time.monotonic()
        done, pending = both.wait(8, return_when=jx.FIRST_COMPLETED)
        assert time.monotonic() - started < 2
        assert len(done) == 1 and len(pending) == 1
    finally:
        other.close()
        slow.get(10)
