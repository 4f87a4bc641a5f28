"""Views' ``concurrent.futures`` executors with real engines: the Executor API's meanings."""

from __future__ import annotations

import sys
import time

import cloudpickle
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
