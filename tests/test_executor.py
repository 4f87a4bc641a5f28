"""Views' ``concurrent.futures`` executors with real engines: the Executor API's meanings."""

from __future__ import annotations

import concurrent.futures
import os
import signal
import sys
import threading
import time

import cloudpickle
import numpy as np
import pytest

import jupyter_ext as jx

cloudpickle.register_pickle_by_value(sys.modules[__name__])


def test_shutdown_cancel_futures_aborts_only_the_executors_own_work(rc):
    """``shutdown(cancel_futures=True)`` aborts what this executor submitted and has not
    started; the view's other work still runs (it aborted everything the view had
    outstanding)."""
    busy = rc[:].apply_async(time.sleep, 1)  # (the queued tasks below wait behind it)
    view = rc.load_balanced_view()
    other = view.apply_async(abs, -5)
    ex = view.executor
    mine = ex.submit(abs, -1)
    mapped = ex.map(abs, [-2, -3])
    ex.shutdown(wait=True, cancel_futures=True)
    assert other.get(10) == 5
    with pytest.raises(jx.TaskAborted):
        mine.result(10)
    with pytest.raises(jx.TaskAborted):
        next(mapped)
    busy.get(10)
    with pytest.raises(RuntimeError, match="shutdown"):
        ex.submit(abs, 1)


def test_map_timeout_counts_from_the_call_and_gives_the_results_there(rc):
    """As ``concurrent.futures``' map: the timeout counts from the call to map (it
    counted from the first ``next``), the results there by then are given (none was:
    the whole map had to be done), and ``next`` raises ``concurrent.futures.TimeoutError``
    for the first one not there."""
    ex = rc.load_balanced_view().executor
    started = time.monotonic()
    bounded = ex.map(lambda x: time.sleep(x) or x, [0.1, 2.5], timeout=1)
    time.sleep(max(0, started + 0.8 - time.monotonic()))
    assert next(bounded) == 0.1  # (there before the timeout, asked for after 0.8 s)
    with pytest.raises(concurrent.futures.TimeoutError):
        next(bounded)
    assert time.monotonic() - started < 1.7  # (1 s from the call, not 1 s from next)
    with pytest.raises(TypeError, match="timeout"):
        ex.map(abs, [1], timeout="1")
    # a negative timeout, of any real type, has passed already: what is not there is late
    started = time.monotonic()
    late = ex.map(time.sleep, [2], timeout=np.float32(-1))
    with pytest.raises(concurrent.futures.TimeoutError):
        next(late)
    assert time.monotonic() - started < 1.5
    rc.wait(timeout=30)


@pytest.mark.parametrize("timeout", [None, 30])
def test_ctrl_c_while_iterating_a_map_interrupts_its_engines(rc, timeout):
    """Ctrl-C while waiting for the next result of executor.map interrupts the engines
    running the map, as Ctrl-C in ``AsyncResult.get`` does (they ran on)."""
    ex = rc.load_balanced_view().executor
    results = ex.map(time.sleep, [5, 5], timeout=timeout)
    timer = threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGINT))
    started = time.monotonic()
    timer.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            next(results)
    finally:
        timer.cancel()
    assert rc.wait(timeout=10)
    assert time.monotonic() - started < 3.5  # (the sleeps of 5 s were cut short)


def test_a_direct_views_executor_map_takes_a_chunksize(rc):
    """A DirectView's map sends one chunk per engine, so its executor's map ignores
    ``chunksize`` as ``ThreadPoolExecutor``'s does (it raised TypeError)."""
    with rc[:].executor as ex:
        assert list(ex.map(abs, [-1, -2, -3], chunksize=2)) == [1, 2, 3]
